"""``duet.store`` on the owner's side: what is hosted, and ``send`` to host more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from duet_p2p.errors import DuetError
from duet_p2p.table import Table, TableView, uid_label

if TYPE_CHECKING:
    from duet_p2p.owner.owner import Owner


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

    def __init__(self, owner: Owner) -> None:
        self._core = owner

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
        self._core.store.remove(object_id)  # every session is told; its scientist re-lists

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
