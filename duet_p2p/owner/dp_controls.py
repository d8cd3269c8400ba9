"""``duet.dp`` for the owner: privacy budgets per dataset and scientist, and what was spent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from duet_p2p.permissions.ledger import Cap, LedgerTable, PrivacyLedger
from duet_p2p.table import Table, TableView, format_clock

if TYPE_CHECKING:
    from duet_p2p.owner.owner import Owner


class OwnerDP:
    """Set budgets, then let a ``dp=True`` handler release queries within them:

    duet.dp.set_budget(dataset="ages", epsilon=1.0)          # each scientist
    duet.dp.set_total_budget(dataset="ages", epsilon=5.0)    # all of them together
    duet.requests.add_handler("accept", dp=True, max_epsilon=0.5)
    duet.dp.budget                                           # what is left
    """

    def __init__(self, core: Owner) -> None:
        self._core = core

    @property
    def ledger(self) -> PrivacyLedger:
        """The ledger file shared by every session of this owner (see ``dp_ledger=``)."""
        return self._core.ledger

    def set_budget(
        self, dataset: str, epsilon: float, delta: float = 0.0, client_id: str | None = None
    ) -> Cap:
        """Each scientist (``client_id=None``), or the one with that Client ID, may spend at
        most ``epsilon`` (and ``delta``) on the objects tagged ``dataset``, over all their
        sessions. A scientist with a budget of their own is not bound by the default."""
        cap = self.ledger.set_budget(dataset, epsilon, delta, client_id)
        self._audit(cap)
        return cap

    def set_total_budget(self, dataset: str, epsilon: float, delta: float = 0.0) -> Cap:
        """All scientists together may spend at most this on ``dataset``: the bound that
        holds whoever asks (new Client IDs included)."""
        cap = self.ledger.set_total_budget(dataset, epsilon, delta)
        self._audit(cap)
        return cap

    def _audit(self, cap: Cap) -> None:
        self._core.audit.event("dp_budget_set", dataset=cap.dataset, scope=cap.scope,
                               epsilon=str(cap.epsilon), delta=str(cap.delta))  # fmt: skip

    @property
    def budget(self) -> LedgerTable:
        """Every budget and what was spent against it."""
        return self.ledger.table()

    @property
    def debits(self) -> DebitTable:
        """Every release that spent budget, oldest first."""
        return DebitTable(self.ledger)


class DebitTable(TableView):
    def __init__(self, ledger: PrivacyLedger) -> None:
        self._ledger = ledger

    def table(self) -> Table:
        rows = [[format_clock(d.at), d.dataset, d.client_id, d.statistic, str(d.epsilon),
                 str(d.delta), d.request_id[:8]] for d in self._ledger.debits()]  # fmt: skip
        columns = ["At", "Dataset", "Scientist", "Statistic", "Epsilon", "Delta", "Request"]
        return Table(columns, rows, "Privacy budget spent", empty_text="Nothing spent yet.")
