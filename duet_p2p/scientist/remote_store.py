"""The scientist's view of the owner's store: the listing, never a value."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from duet_p2p.schema import schema_from_peer
from duet_p2p.table import Table, TableView, uid_label
from duet_p2p.text import printable

if TYPE_CHECKING:
    from duet_p2p.scientist.pointer import Pointer
    from duet_p2p.scientist.protocol import SessionCore

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

    def __init__(self, core: SessionCore) -> None:
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
