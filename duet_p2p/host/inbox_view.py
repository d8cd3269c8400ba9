"""``host.inbox``: session requests scientists sent through a registry, and the owner's
answers (accept, decline, propose other times).

Times show in the owner's local time zone. A request's message was sealed to the host's
key; it shows opened (and made printable: a scientist chose it). Each answer is a signed
reply sent to the registry the request came through; the entry returned is the session as
the registry holds it afterwards.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from duet_p2p.errors import DuetError
from duet_p2p.table import Table, TableView
from duet_p2p.text import printable

if TYPE_CHECKING:
    from duet_p2p.registry.results import Session

__all__ = ["InboxEntry", "InboxLink", "InboxView", "format_local", "local_time"]

MAX_MESSAGE_CHARS = 2000
OUT_OF_RANGE = "(a date out of range)"

T = TypeVar("T")


class InboxLink(Protocol):
    """What an entry needs of the link that read it (a ``RegistryLink``; this module sits
    below it)."""

    async def reply_async(
        self,
        entry: InboxEntry,
        action: str,
        *,
        start: datetime | float | None = ...,
        proposed: Sequence[datetime | float] = ...,
        message: str = ...,
    ) -> InboxEntry: ...

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = ...) -> T: ...


def local_time(timestamp: float | None) -> datetime | None:
    """A unix time as an aware datetime in this machine's time zone (None for None, or for
    a time no datetime holds: a signed request may be dated up to year 36812)."""
    if timestamp is None:
        return None
    try:
        return datetime.fromtimestamp(timestamp, UTC).astimezone()
    except (OverflowError, OSError, ValueError):
        return None


def format_local(timestamp: float | None) -> str:
    """``2025-06-03 14:00 CEST`` in this machine's time zone (empty for None)."""
    if timestamp is None:
        return ""
    when = local_time(timestamp)
    return OUT_OF_RANGE if when is None else when.strftime("%Y-%m-%d %H:%M %Z").strip()


def _epoch(value: datetime | float | int) -> float:
    """A time as UTC epoch seconds; a naive datetime is local time."""
    if isinstance(value, datetime):
        return (value if value.tzinfo is not None else value.astimezone()).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise DuetError("a time is a datetime or UTC epoch seconds")


class InboxEntry:
    """One session request to this host: who asked, for which listing, when, and its
    status; ``accept``, ``decline`` and ``propose`` answer it."""

    def __init__(
        self, link: InboxLink, registry: str, session: Session, listing_name: str,
        message: str,
    ) -> None:  # fmt: skip
        self._link = link
        self.registry = registry
        self.session = session
        self.listing_name = printable(listing_name, 200)
        self.message = printable(message, MAX_MESSAGE_CHARS, multiline=True)

    @property
    def request_id(self) -> str:
        return self.session.request_id

    @property
    def listing_id(self) -> str:
        return self.session.listing_id

    @property
    def scientist_id(self) -> str:
        return self.session.scientist_id

    @property
    def status(self) -> str:
        """pending, proposed (by the host, waiting for the scientist), accepted, declined or
        withdrawn."""
        return self.session.state.status

    @property
    def minutes(self) -> int:
        return self.session.state.minutes

    @property
    def proposed(self) -> tuple[float, ...]:
        """The times on the table now (UTC epoch seconds)."""
        return tuple(self.session.state.proposed)

    @property
    def proposed_local(self) -> list[datetime]:
        return [when for when in map(local_time, self.proposed) if when is not None]

    @property
    def start(self) -> float | None:
        """The agreed start (UTC epoch seconds), once accepted."""
        return self.session.state.start

    @property
    def start_local(self) -> datetime | None:
        return local_time(self.start)

    @property
    def time_zone(self) -> str:
        """The scientist's time zone (IANA)."""
        return str(self.session.request.request.time_zone)

    @property
    def requested_at(self) -> float:
        return float(self.session.request.request.at)

    # -- answering --------------------------------------------------------------------------

    async def accept_async(self, start: datetime | float | None = None) -> InboxEntry:
        """:meth:`accept` on the host's loop."""
        proposed = self.proposed
        if self.status != "pending":
            raise DuetError(f"session request {self.request_id} is {self.status}; only a "
                            "pending one can be accepted")  # fmt: skip
        chosen = proposed[0] if start is None else _epoch(start)
        if chosen not in proposed:
            times = ", ".join(format_local(t) for t in proposed)
            raise DuetError(f"accept one of the proposed times: {times}")
        return await self._link.reply_async(self, "accept", start=chosen)

    def accept(self, start: datetime | float | None = None) -> InboxEntry:
        """Accept the request at ``start`` (one of the proposed times; default the first)."""
        return self._link.call(self.accept_async(start))

    async def decline_async(self, reason: str = "") -> InboxEntry:
        """:meth:`decline` on the host's loop."""
        return await self._link.reply_async(self, "decline", message=reason)

    def decline(self, reason: str = "") -> InboxEntry:
        """Decline the request; ``reason`` is sealed to the scientist."""
        return self._link.call(self.decline_async(reason))

    async def propose_async(
        self, times: Sequence[datetime | float] | datetime | float, message: str = ""
    ) -> InboxEntry:
        """:meth:`propose` on the host's loop."""
        if isinstance(times, datetime | int | float):
            times = [times]
        chosen = [_epoch(t) for t in times]
        return await self._link.reply_async(self, "propose", proposed=chosen, message=message)

    def propose(
        self, times: Sequence[datetime | float] | datetime | float, message: str = ""
    ) -> InboxEntry:
        """Propose other start times (1 to 5, whole minutes; naive datetimes are local)."""
        return self._link.call(self.propose_async(times, message))

    # -- showing ----------------------------------------------------------------------------

    def row(self) -> dict[str, Any]:
        """Plain JSON values (for the control socket)."""
        return {
            "request_id": self.request_id, "listing_id": self.listing_id,
            "listing": self.listing_name, "scientist_id": self.scientist_id,
            "proposed": list(self.proposed), "minutes": self.minutes, "message": self.message,
            "status": self.status, "start": self.start, "time_zone": self.time_zone,
            "registry": self.registry, "requested_at": self.requested_at,
        }  # fmt: skip

    def cells(self) -> list[object]:
        proposed = ", ".join(format_local(t) for t in self.proposed)
        return [self.request_id, self.listing_name, self.scientist_id, proposed, self.minutes,
                self.message, self.status, format_local(self.start)]  # fmt: skip

    def __repr__(self) -> str:
        start = format_local(self.start)
        when = f" at {start}" if start else ""
        return (f"<InboxEntry {self.request_id} for {self.listing_name!r} from "
                f"{self.scientist_id}: {self.status}{when}>")  # fmt: skip


COLUMNS = ["Request ID", "Listing", "Scientist ID", "Proposed (local)", "Minutes", "Message",
           "Status", "Start (local)"]  # fmt: skip


class InboxView(TableView):
    """``host.inbox``: session requests, newest first; ``[i]`` or ``["<request id>"]`` is
    an :class:`InboxEntry`."""

    def __init__(self, entries: Sequence[InboxEntry], *, note: str | None = None) -> None:
        self.entries = list(entries)
        self.note = note
        """Set when a registry could not be read (its requests show as last read)."""

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[InboxEntry]:
        return iter(self.entries)

    def __getitem__(self, key: int | str) -> InboxEntry:
        if isinstance(key, str):
            for entry in self.entries:
                if entry.request_id == key:
                    return entry
            raise KeyError(f"no session request {printable(key, 64)!r} in the inbox")
        return self.entries[key]

    @property
    def pending(self) -> list[InboxEntry]:
        """The requests waiting for the owner's answer."""
        return [entry for entry in self.entries if entry.status == "pending"]

    def table(self) -> Table:
        title = None if self.note is None else printable(self.note, 500)
        return Table(COLUMNS, [entry.cells() for entry in self.entries], title,
                     empty_text="No session requests.", max_cell_chars=80)  # fmt: skip
