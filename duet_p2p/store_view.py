"""Views of the store: the scientist's listing of the owner's objects, the owner's own."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from duet_p2p.errors import DuetError
from duet_p2p.schema import schema_from_peer
from duet_p2p.table import Table, TableView, uid_label
from duet_p2p.text import printable

if TYPE_CHECKING:
    from duet_p2p.owner import OwnerCore
    from duet_p2p.pointer import Pointer
    from duet_p2p.scientist import ScientistCore

MAX_TAGS = 64
"""Tags kept per listed object."""
MAX_TAG_CHARS = 100
MAX_DESCRIPTION_CHARS = 1000
MAX_NAME_CHARS = 100
"""Longest type or dtype name kept from a listing."""
MAX_DIMS = 64
_OBJECT_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def entry_from_peer(entry: object) -> dict[str, Any] | None:
    """One entry of the owner's listing as the scientist keeps it: None (skip it) without
    a well-formed ID; otherwise the known fields only, text printable and bounded, the
    shape as plain integers. Every view of the listing (tables, ``info``, pointer names,
    error messages) shows only what this returns."""
    if not isinstance(entry, dict):
        return None
    object_id = entry.get("id")
    if not isinstance(object_id, str) or not _OBJECT_ID.fullmatch(object_id):
        return None
    checked: dict[str, Any] = {
        "id": object_id,
        "tags": _tags(entry.get("tags")),
        "description": printable(entry.get("description") or "", MAX_DESCRIPTION_CHARS),
        "type": printable(entry.get("type") or "", MAX_NAME_CHARS),
        "kind": "module" if entry.get("kind") == "module" else "tensor",
    }
    if isinstance(entry.get("public"), bool):
        checked["public"] = entry["public"]
    shape = _shape(entry.get("shape"))
    if shape is not None:
        checked["shape"] = shape
    if "dtype" in entry:
        checked["dtype"] = printable(entry["dtype"], MAX_NAME_CHARS)
    schema = schema_from_peer(entry.get("schema"))
    if schema is not None:
        checked["schema"] = schema
    return checked


def _tags(value: object) -> list[str]:
    if not isinstance(value, (list, tuple)):
        return []
    tags = (printable(tag, MAX_TAG_CHARS) for tag in value[:MAX_TAGS])
    return [tag for tag in tags if tag.strip()]


def _shape(value: object) -> list[int] | None:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_DIMS:
        return None
    if not all(type(size) is int and 0 <= size < 2**63 for size in value):
        return None
    return list(value)


class RemoteStore(TableView):
    """The owner's searchable objects, as the scientist sees them (never their values)."""

    def __init__(self, core: ScientistCore) -> None:
        self._core = core
        self._entries: list[dict[str, Any]] | None = None
        self._version = -1

    def refresh(self) -> RemoteStore:
        """Fetch the listing again."""
        self._version = self._core.store_version
        self._entries = self._core.sync(self._core.store_list(), timeout=60)
        return self

    def _listing(self) -> list[dict[str, Any]]:
        if self._entries is None or self._version != self._core.store_version:
            self.refresh()
        assert self._entries is not None
        return self._entries

    def __len__(self) -> int:
        return len(self._listing())

    def __iter__(self) -> Iterator[Pointer]:
        return iter([self._core.pointer_for(e) for e in self._listing()])

    def __getitem__(self, key: int | str) -> Pointer:
        """By position, by tag (must be unique), or by object ID."""
        entries = self._listing()
        if isinstance(key, int) and not isinstance(key, bool):
            try:
                return self._core.pointer_for(entries[key])
            except IndexError:
                raise IndexError(
                    f"the store has {len(entries)} objects; there is no index {key}"
                ) from None
        if not isinstance(key, str):
            raise TypeError("index the store by position (int), tag or ID (str)")
        by_id = [e for e in entries if e["id"] == key]
        if by_id:
            return self._core.pointer_for(by_id[0])
        tagged = [e for e in entries if key in (e.get("tags") or [])]
        if not tagged:
            raise KeyError(f"no object in the store is tagged {key!r}")
        if len(tagged) > 1:
            ids = ", ".join(e["id"][:8] for e in tagged)
            raise KeyError(
                f"{len(tagged)} objects are tagged {key!r} ({ids}); index by position or ID"
            )
        return self._core.pointer_for(tagged[0])

    def info(self, key: int | str) -> dict[str, Any]:
        """What the listing shows of one object (by position, tag or ID): id, tags,
        description, type, and ``shape`` and ``dtype`` where the owner shows them."""
        object_id = self[key].id
        return dict(next(e for e in self._listing() if e["id"] == object_id))

    def table(self) -> Table:
        rows = []
        for entry in self._listing():
            rows.append([
                uid_label(entry["id"]),
                list(entry.get("tags") or []),
                entry.get("description", ""),
                entry.get("type", ""),
                _metadata(entry),
            ])  # fmt: skip
        return Table(
            ["ID", "Tags", "Description", "Type", "Shape / Columns"],
            rows,
            empty_text="The store is empty.",
        )


def _metadata(entry: dict[str, Any]) -> str:
    parts = []
    if "shape" in entry:
        parts.append(f"{tuple(entry['shape'])} {entry.get('dtype', '')}".strip())
    if "schema" in entry:
        parts.append("columns: " + ", ".join(entry["schema"]["columns"]))
    return "; ".join(parts)


@dataclass(frozen=True)
class HostedObject:
    """The owner's receipt for an object placed in the store."""

    id: str
    tags: tuple[str, ...]
    description: str
    searchable: bool
    public: bool

    def __repr__(self) -> str:
        tags = ", ".join(self.tags)
        return f"<HostedObject {uid_label(self.id)} [{tags}]>"


class OwnerStoreView(TableView):
    """``duet.store`` on the owner's side: what is hosted, and ``send`` to host more."""

    def __init__(self, core: OwnerCore) -> None:
        self._core = core

    def send(
        self,
        obj: Any,
        *,
        tags: list[str] | tuple[str, ...] | None = None,
        description: str | None = None,
        searchable: bool = True,
        public: bool = False,
        show_metadata: bool = False,
        columns: list[str] | tuple[str, ...] | None = None,
        identifier: str | None = None,
        rows_per_identifier: int = 1,
    ) -> HostedObject:
        """Host ``obj`` (a tensor, module or pandas DataFrame); private unless
        ``public=True``.

        ``columns`` names a tensor's columns (its second dimension; a 1-D tensor is one
        column): the names are listed, so scientists can ask differentially private
        statistics of a column. ``identifier`` names the column that says which person a
        row belongs to: DP queries then protect each person's first ``rows_per_identifier``
        rows together (later rows are left out of DP statistics)."""
        tags = tuple(tags) if tags is not None else tuple(getattr(obj, "_duet_tags", ()))
        if description is None:
            description = getattr(obj, "_duet_description", "")
        record = self._core.host(
            obj, tags=tags, description=description or "", searchable=searchable,
            public=public, show_metadata=show_metadata, columns=columns, identifier=identifier,
            rows_per_identifier=rows_per_identifier,
        )  # fmt: skip
        return HostedObject(record.id, record.tags, record.description, searchable, public)

    def remove(self, object_id: str) -> None:
        """Stop hosting an object."""
        record = self._core.store.get(object_id)
        if record is None or record.origin != "owner":
            raise DuetError(f"no hosted object {object_id}")
        self._core.store.remove(object_id)
        core = self._core
        if record.searchable and core.loop is not None and not core._closed:
            core.loop.call_soon_threadsafe(core._notify_store_changed)  # the peer re-lists

    def _hosted(self) -> list[Any]:
        return self._core.store.owner_records()

    def __len__(self) -> int:
        return len(self._hosted())

    def __getitem__(self, index: int) -> Any:
        """The hosted value itself (the owner's own data)."""
        return self._hosted()[index].value

    def table(self) -> Table:
        rows = [
            [uid_label(r.id), list(r.tags), r.description, r.type_name,
             "yes" if r.searchable else "no", "no" if r.private else "yes"]
            for r in self._hosted()
        ]  # fmt: skip
        return Table(
            ["ID", "Tags", "Description", "Type", "Searchable", "Public"],
            rows,
            empty_text="Nothing is hosted yet: tensor.send(duet) or duet.store.send(obj).",
        )
