"""The privacy budget ledger: what each scientist may still spend on each dataset, on disk.

The owner sets budgets per dataset (a tag of hosted objects): one for a named scientist
(their Client ID), a default that every other scientist gets, and optionally a total that
all scientists share. A differentially private release first *reserves* its (epsilon,
delta) against every budget of the dataset's tags, so a query that would overspend is
refused before it runs; the reservation becomes a debit (a row in SQLite, written before
the value leaves) when the release is accepted, or is returned when it is not.

Releases compose sequentially: a scientist's spend on a dataset is the sum of the (epsilon,
delta) of its releases, each the privacy map OpenDP computed for that measurement. Amounts
are stored as exact decimals and added as exact fractions, so ten queries of 0.1 fit a
budget of 1.0 exactly, and no rounding ever lets a release through that the budget does
not cover (however small or many the amounts).
"""

from __future__ import annotations

import itertools
import math
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal, localcontext
from fractions import Fraction
from pathlib import Path

from duet_p2p.errors import BudgetExceeded, DuetError
from duet_p2p.paths import data_dir
from duet_p2p.table import Table, TableView, format_clock

LEDGER_FILE = "privacy_ledger.sqlite"
MAX_EPSILON = Decimal(1000)
"""Largest budget or spend accepted (a larger epsilon protects nothing)."""
DEFAULT_SCOPE = "default"
TOTAL_SCOPE = "total"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    dataset TEXT NOT NULL, scope TEXT NOT NULL, epsilon TEXT NOT NULL, delta TEXT NOT NULL,
    set_at REAL NOT NULL, PRIMARY KEY (dataset, scope));
CREATE TABLE IF NOT EXISTS spends (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, dataset TEXT NOT NULL, client_id TEXT NOT NULL,
    epsilon TEXT NOT NULL, delta TEXT NOT NULL, request_id TEXT NOT NULL,
    statistic TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS spends_by_dataset ON spends (dataset, client_id);
"""


def amount(value: float | int | str | Decimal, what: str = "epsilon") -> Decimal:
    """A budget amount as an exact decimal (a float's shortest spelling); refuses
    negative, non-finite and absurd values."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number, not a bool")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what} must be finite, not {value}")
        value = repr(value)
    try:
        exact = Decimal(value)
    except ArithmeticError:
        raise ValueError(f"{what} must be a number, not {value!r}") from None
    if not exact.is_finite() or exact < 0 or exact > MAX_EPSILON:
        raise ValueError(f"{what} must be between 0 and {MAX_EPSILON}, not {value}")
    return exact


def float_at_most(value: Decimal) -> float:
    """The largest float not above ``value``: what a mechanism is calibrated to, so what
    it really costs never exceeds what the ledger debits."""
    result = float(value)
    if Decimal(result) > value:
        result = math.nextafter(result, -math.inf)
    return result


@dataclass(frozen=True)
class Cap:
    """One budget: at most ``epsilon`` and ``delta`` over ``scope`` (a scientist, the
    default for each scientist, or the total of all scientists)."""

    dataset: str
    scope: str
    epsilon: Decimal
    delta: Decimal


@dataclass(frozen=True)
class Left:
    """What is left of the budgets one scientist has on one dataset (the tighter of the
    scientist's own and the shared total), as exact fractions."""

    dataset: str
    epsilon: Fraction
    delta: Fraction
    epsilon_budget: Fraction
    epsilon_spent: Fraction
    delta_budget: Fraction
    delta_spent: Fraction


def exact_text(value: Fraction | Decimal) -> str:
    """An amount as a decimal string, to 28 significant digits rounded down (what is shown
    as left is never more than what is left)."""
    fraction = Fraction(value)
    with localcontext() as context:
        context.rounding = ROUND_FLOOR
        text = str(Decimal(fraction.numerator) / Decimal(fraction.denominator))
    return text


@dataclass(frozen=True)
class Debit:
    at: float
    dataset: str
    client_id: str
    epsilon: Decimal
    delta: Decimal
    request_id: str
    statistic: str


@dataclass(eq=False)
class Reservation:
    """Budget held for one release that is waiting for its decision."""

    ledger: PrivacyLedger
    client_id: str
    datasets: tuple[str, ...]
    epsilon: Decimal
    delta: Decimal
    statistic: str
    number: int = field(default_factory=itertools.count().__next__)
    done: bool = False
    before: dict[str, Left] = field(default_factory=dict)
    """What was left on each dataset before this reservation (for the request view)."""

    def commit(self, request_id: str) -> list[Debit]:
        """Write the debits (one per budgeted dataset); raises BudgetExceeded if another
        process spent the budget meanwhile. Call before the value leaves."""
        return self.ledger._commit(self, request_id)

    def cancel(self) -> None:
        """Return the budget (the release was denied, expired or withdrawn)."""
        self.ledger._cancel(self)


class PrivacyLedger:
    """Budgets and spends in one SQLite file (0600), safe across threads and processes.

    Use :func:`open_ledger` so every session of a process shares one ledger (and its
    reservations) per file.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else data_dir() / LEDGER_FILE
        self._lock = threading.RLock()
        self._reserved: dict[int, Reservation] = {}
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            db.executescript(_SCHEMA)

    # -- the owner's settings ----------------------------------------------------------

    def set_budget(
        self, dataset: str, epsilon: float, delta: float = 0.0, client_id: str | None = None
    ) -> Cap:
        """Each scientist (``client_id=None``) or one scientist may spend at most
        ``epsilon`` and ``delta`` on ``dataset``, summed over all their releases."""
        scope = DEFAULT_SCOPE if client_id is None else _scientist_scope(client_id)
        return self._set(dataset, scope, epsilon, delta)

    def set_total_budget(self, dataset: str, epsilon: float, delta: float = 0.0) -> Cap:
        """All scientists together may spend at most this on ``dataset``."""
        return self._set(dataset, TOTAL_SCOPE, epsilon, delta)

    def remove_budget(self, dataset: str, client_id: str | None = None, *, total: bool = False):
        """Forget a budget (spends stay recorded). Without any budget, no query runs."""
        scope = TOTAL_SCOPE if total else (
            DEFAULT_SCOPE if client_id is None else _scientist_scope(client_id)
        )  # fmt: skip
        with self._lock, self._connect() as db:
            db.execute("DELETE FROM budgets WHERE dataset = ? AND scope = ?", (dataset, scope))

    def _set(self, dataset: str, scope: str, epsilon: float, delta: float) -> Cap:
        dataset = _dataset_name(dataset)
        cap = Cap(dataset, scope, amount(epsilon), amount(delta, "delta"))
        if cap.delta >= 1:
            raise ValueError("delta must be below 1")
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO budgets VALUES (?, ?, ?, ?, ?)",
                (dataset, scope, str(cap.epsilon), str(cap.delta), time.time()),
            )
        return cap

    # -- reading -----------------------------------------------------------------------

    def caps(self) -> list[Cap]:
        with self._connect() as db:
            rows = db.execute("SELECT dataset, scope, epsilon, delta FROM budgets").fetchall()
        return [Cap(d, s, Decimal(e), Decimal(dl)) for d, s, e, dl in sorted(rows)]

    def debits(self, client_id: str | None = None, dataset: str | None = None) -> list[Debit]:
        """Every debit written, oldest first, optionally of one scientist or dataset."""
        query = "SELECT at, dataset, client_id, epsilon, delta, request_id, statistic FROM spends"
        where, args = [], []
        if client_id is not None:
            where.append("client_id = ?")
            args.append(client_id)
        if dataset is not None:
            where.append("dataset = ?")
            args.append(dataset)
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        return [Debit(at, d, c, Decimal(e), Decimal(dl), r, s) for at, d, c, e, dl, r, s in rows]

    def left(self, client_id: str, dataset: str) -> Left | None:
        """What ``client_id`` may still spend on ``dataset`` (None: no budget applies)."""
        with self._lock, self._connect() as db:
            return self._left(db, client_id, dataset, exclude=None)

    def datasets_for(self, client_id: str) -> list[Left]:
        """Every dataset with a budget that applies to ``client_id``, and what is left."""
        with self._lock, self._connect() as db:
            names = sorted({row[0] for row in db.execute("SELECT dataset FROM budgets")})
            found = (self._left(db, client_id, name, exclude=None) for name in names)
            return [left for left in found if left is not None]

    # -- spending ----------------------------------------------------------------------

    def reserve(
        self,
        client_id: str,
        datasets: Iterable[str],
        epsilon: Decimal,
        delta: Decimal,
        statistic: str,
    ) -> Reservation:
        """Hold (epsilon, delta) on every budgeted dataset among ``datasets``; raises
        BudgetExceeded when one has too little left, or when none has a budget."""
        names = tuple(sorted(set(datasets)))
        with self._lock, self._connect() as db:
            before = self._check(db, client_id, names, epsilon, delta, exclude=None)
            reservation = Reservation(self, client_id, tuple(before), epsilon, delta,
                                      statistic[:200], before=before)  # fmt: skip
            self._reserved[reservation.number] = reservation
        return reservation

    def _commit(self, reservation: Reservation, request_id: str) -> list[Debit]:
        with self._lock:
            if reservation.done:
                raise DuetError("this privacy budget reservation was already used or returned")
            with self._connect() as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._check(
                        db, reservation.client_id, reservation.datasets, reservation.epsilon,
                        reservation.delta, exclude=reservation,
                    )  # fmt: skip
                    now = time.time()
                    debits = [
                        Debit(now, name, reservation.client_id, reservation.epsilon,
                              reservation.delta, request_id, reservation.statistic)
                        for name in reservation.datasets
                    ]  # fmt: skip
                    db.executemany(
                        "INSERT INTO spends (at, dataset, client_id, epsilon, delta, "
                        "request_id, statistic) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(d.at, d.dataset, d.client_id, str(d.epsilon), str(d.delta),
                          d.request_id, d.statistic) for d in debits],
                    )  # fmt: skip
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    self._cancel(reservation)
                    raise
            self._cancel(reservation)
            return debits

    def _cancel(self, reservation: Reservation) -> None:
        with self._lock:
            reservation.done = True
            self._reserved.pop(reservation.number, None)

    # -- internals ---------------------------------------------------------------------

    def _check(
        self,
        db: sqlite3.Connection,
        client_id: str,
        names: tuple[str, ...],
        epsilon: Decimal,
        delta: Decimal,
        exclude: Reservation | None,
    ) -> dict[str, Left]:
        before: dict[str, Left] = {}
        for name in names:
            left = self._left(db, client_id, name, exclude)
            if left is None:
                continue
            if Fraction(epsilon) > left.epsilon or Fraction(delta) > left.delta:
                what = "epsilon" if Fraction(epsilon) > left.epsilon else "delta"
                raise BudgetExceeded(
                    f"this query needs {what} {epsilon if what == 'epsilon' else delta} but "
                    f"only epsilon {exact_text(left.epsilon)}, delta {exact_text(left.delta)} "
                    f"is left of your privacy budget on {name!r}",
                    dataset=name,
                    remaining_epsilon=float(left.epsilon),
                )
            before[name] = left
        if not before:
            shown = ", ".join(repr(n) for n in names) or "this object"
            raise BudgetExceeded(
                f"the owner set no privacy budget for you on {shown}: no differentially "
                "private query runs on it",
                dataset=names[0] if names else None,
                remaining_epsilon=0.0,
            )
        return before

    def _left(
        self, db: sqlite3.Connection, client_id: str, dataset: str, exclude: Reservation | None
    ) -> Left | None:
        rows = dict(
            (scope, (Fraction(Decimal(e)), Fraction(Decimal(d))))
            for scope, e, d in db.execute(
                "SELECT scope, epsilon, delta FROM budgets WHERE dataset = ?", (dataset,)
            )
        )
        own = rows.get(_scientist_scope(client_id)) or rows.get(DEFAULT_SCOPE)
        total = rows.get(TOTAL_SCOPE)
        if own is None and total is None:
            return None
        spent_own = self._spent(db, dataset, client_id)
        held_own = self._held(dataset, client_id, exclude)
        spent_all = self._spent(db, dataset, None)
        held_all = self._held(dataset, None, exclude)
        limits: list[tuple[Fraction, Fraction, Fraction, Fraction]] = []
        if own is not None:
            limits.append((own[0], own[1], spent_own[0] + held_own[0], spent_own[1] + held_own[1]))
        if total is not None:
            limits.append((total[0], total[1], spent_all[0] + held_all[0],
                           spent_all[1] + held_all[1]))  # fmt: skip
        epsilon_left = min(max(Fraction(0), cap - used) for cap, _, used, _ in limits)
        delta_left = min(max(Fraction(0), cap - used) for _, cap, _, used in limits)
        budget = own if own is not None else total
        assert budget is not None
        return Left(dataset, epsilon_left, delta_left, budget[0], spent_own[0], budget[1],
                    spent_own[1])  # fmt: skip

    def _spent(
        self, db: sqlite3.Connection, dataset: str, client_id: str | None
    ) -> tuple[Fraction, Fraction]:
        if client_id is None:
            rows = db.execute("SELECT epsilon, delta FROM spends WHERE dataset = ?", (dataset,))
        else:
            rows = db.execute(
                "SELECT epsilon, delta FROM spends WHERE dataset = ? AND client_id = ?",
                (dataset, client_id),
            )
        epsilon = delta = Fraction(0)
        for e, d in rows:
            epsilon += Fraction(Decimal(e))
            delta += Fraction(Decimal(d))
        return epsilon, delta

    def _held(
        self, dataset: str, client_id: str | None, exclude: Reservation | None
    ) -> tuple[Fraction, Fraction]:
        epsilon = delta = Fraction(0)
        for reservation in self._reserved.values():
            if reservation is exclude or dataset not in reservation.datasets:
                continue
            if client_id is None or reservation.client_id == client_id:
                epsilon += Fraction(reservation.epsilon)
                delta += Fraction(reservation.delta)
        return epsilon, delta

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (kept open: opening one costs more than a query).
        Every write is its own transaction, synced to disk before it returns."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        yield db

    # -- views -------------------------------------------------------------------------

    def table(self) -> LedgerTable:
        """Every budget and what was spent against it, as a table."""
        return LedgerTable(self)


class LedgerTable(TableView):
    """The owner's view of the ledger: one row per budget."""

    def __init__(self, ledger: PrivacyLedger) -> None:
        self._ledger = ledger

    def table(self) -> Table:
        debits = self._ledger.debits()
        rows = []
        for cap in self._ledger.caps():
            mine = [d for d in debits if d.dataset == cap.dataset and _matches(cap.scope, d)]
            if cap.scope == DEFAULT_SCOPE:
                # spend of scientists with their own budget counts there, not here
                own = {c.scope for c in self._ledger.caps() if c.dataset == cap.dataset}
                mine = [d for d in mine if _scientist_scope(d.client_id) not in own]
            spent = sum((Fraction(d.epsilon) for d in mine), Fraction(0))
            spent_delta = sum((Fraction(d.delta) for d in mine), Fraction(0))
            scientists = len({d.client_id for d in mine})
            rows.append([cap.dataset, _scope_text(cap.scope), str(cap.epsilon),
                         exact_text(spent), str(cap.delta), exact_text(spent_delta),
                         scientists, format_clock(mine[-1].at) if mine else ""])  # fmt: skip
        columns = ["Dataset", "Applies to", "Epsilon", "Epsilon Spent", "Delta", "Delta Spent",
                   "Scientists", "Last Spend"]  # fmt: skip
        return Table(
            columns,
            rows,
            "Privacy budgets",
            empty_text="No privacy budgets: duet.dp.set_budget(dataset=..., epsilon=...)",
        )


def _matches(scope: str, debit: Debit) -> bool:
    if scope in (DEFAULT_SCOPE, TOTAL_SCOPE):
        return True
    return scope == _scientist_scope(debit.client_id)


def _scope_text(scope: str) -> str:
    if scope == DEFAULT_SCOPE:
        return "each scientist"
    if scope == TOTAL_SCOPE:
        return "all scientists together"
    return scope.removeprefix("scientist:")


def _scientist_scope(client_id: str) -> str:
    if not isinstance(client_id, str) or not client_id or len(client_id) > 200:
        raise ValueError("client_id must be a scientist's Client ID")
    return f"scientist:{client_id}"


def _dataset_name(dataset: str) -> str:
    if not isinstance(dataset, str) or not dataset.strip() or len(dataset) > 100:
        raise ValueError("dataset must be the tag of hosted data (1 to 100 characters)")
    return dataset


_OPEN: weakref.WeakValueDictionary[str, PrivacyLedger] = weakref.WeakValueDictionary()
_OPEN_LOCK = threading.Lock()


def open_ledger(path: str | os.PathLike[str] | None = None) -> PrivacyLedger:
    """The process's ledger for ``path`` (default: ``privacy_ledger.sqlite`` in the data
    directory, see :func:`duet_p2p.paths.data_dir`), shared by every session using it."""
    resolved = Path(path) if path is not None else data_dir() / LEDGER_FILE
    key = str(resolved.expanduser().resolve())
    with _OPEN_LOCK:
        ledger = _OPEN.get(key)
        if ledger is None:
            ledger = PrivacyLedger(key)
            _OPEN[key] = ledger
        return ledger
