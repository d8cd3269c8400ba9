"""What the registry client returns: verified listings, pages of them, session requests.

A :class:`Listing` is a listing whose signature was verified on this machine, with the
registry's word on presence and rating. From it a scientist connects to the host
(``connect()``), submits an offline job (``submit_job()``), makes mock data shaped like the
real data (``mock()``), reads its Croissant metadata, requests a session or writes a review.
:class:`SearchResults` and :class:`SessionsList` are tables (text, HTML, pandas). Times of
sessions are shown in this machine's time zone. Everything a registry or a host wrote is
shown escaped (``duet_p2p.text.printable`` for text, ``html.escape`` for HTML).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from duet_p2p.registry.listing import ListingSpec, SignedListing
from duet_p2p.registry.plumbing import (
    DEFAULT_TIMEOUT,
    MAX_OFFSET,
    RegistryError,
    open_client,
    resolve_identity,
    run_sync,
)
from duet_p2p.table import Table, TableView
from duet_p2p.text import printable

if TYPE_CHECKING:
    from duet_p2p.duet import Duet
    from duet_p2p.identity import Identity
    from duet_p2p.registry.session import SessionState, SignedSessionReply, SignedSessionRequest

__all__ = ["Listing", "ReviewsList", "SearchResults", "Session", "SessionsList"]

MOCK_MAX_ELEMENTS = 4_000_000
"""Default cap on the values of a tensor mock (``mock(max_elements=...)`` to change)."""
CARD_SCHEMA_ENTRIES = 20


OUT_OF_RANGE = "(a date out of range)"
"""How a time no datetime can hold shows (a signed document may be dated up to 2**40 s,
year 36812; a registry's ``last_seen`` is any finite number)."""


def local_time(timestamp: float | None) -> datetime | None:
    """A unix time as an aware datetime in this machine's time zone (None for None, or for
    a time a datetime cannot hold)."""
    when = utc_time(timestamp)
    if when is None:
        return None
    try:
        return when.astimezone()
    except (OverflowError, OSError, ValueError):
        return None


def utc_time(timestamp: float | None) -> datetime | None:
    """A unix time as an aware UTC datetime (None for None, or out of range)."""
    if timestamp is None:
        return None
    try:
        return datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def format_local(timestamp: float | None) -> str:
    """``2025-06-03 14:00 CEST`` in this machine's time zone (empty for None)."""
    if timestamp is None:
        return ""
    when = local_time(timestamp)
    return OUT_OF_RANGE if when is None else when.strftime("%Y-%m-%d %H:%M %Z").strip()


def _text(value: object, limit: int = 200) -> str:
    return printable(value, limit)


def _esc(value: object, limit: int = 2000) -> str:
    return html.escape(printable(value, limit), quote=True)


def _run(coro: Any, timeout: float) -> Any:
    return run_sync(coro, timeout)


def _client(url: str | None, timeout: float) -> Any:
    return open_client(url, timeout)


def _identity(identity: Identity | str | None) -> Identity:
    return resolve_identity(identity)


def _evidence(metric: Mapping[str, Any], host_id: str) -> str:
    """What backs a metric: its receipt verified against the listing's host, or not."""
    if "receipt" not in metric:
        return "self-reported"
    from duet_p2p.offline.receipt import InvalidReceipt, Receipt

    try:
        receipt = Receipt.from_wire(metric["receipt"])
        receipt.verify(host_id)
    except InvalidReceipt as exc:
        return _text(f"receipt does not verify: {exc}", 200)
    outputs = ", ".join(sorted(receipt.outputs))
    return _text(f"job {receipt.job_id} on this host released {outputs} at "
                 f"{format_local(receipt.released_at)} (receipt verified)", 300)  # fmt: skip


def _rating_text(count: int, average: float | None) -> str:
    return "" if average is None else f"{average:.1f} ({count})"


# -- listings ----------------------------------------------------------------------------


class Listing:
    """A verified listing (``spec``, ``signed``) and the registry's presence and rating.

    ``registry_url`` is where it was found (reviews, sessions and Croissant go there)."""

    def __init__(
        self,
        signed: SignedListing,
        *,
        online: bool = False,
        last_seen: float | None = None,
        rating: tuple[int, float | None] = (0, None),
        registry_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not isinstance(signed, SignedListing):
            raise TypeError("a Listing holds a SignedListing")
        self.signed = signed
        self.online = bool(online)
        self.last_seen = last_seen
        self._rating = rating
        self.registry_url = registry_url
        self.timeout = timeout

    # -- what the owner signed ---------------------------------------------------------

    @property
    def spec(self) -> ListingSpec:
        return self.signed.spec

    @property
    def id(self) -> str:
        return self.spec.listing_id

    listing_id = id

    @property
    def host_id(self) -> str:
        return self.spec.host_id

    @property
    def host_key(self) -> bytes:
        """The host's public key (it hashes to ``host_id``: checked with the signature)."""
        return self.spec.host_key

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def version(self) -> int:
        return self.spec.version

    @property
    def summary(self) -> str:
        return self.spec.summary

    @property
    def tag(self) -> str:
        """The host's name for it: ``duet.store[listing.tag]``, job ``inputs={...: tag}``."""
        return self.spec.tag

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def modality(self) -> str:
        return self.spec.modality

    @property
    def license(self) -> str:
        return self.spec.license

    @property
    def keywords(self) -> list[str]:
        return list(self.spec.keywords)

    @property
    def schema(self) -> list[dict[str, Any]]:
        return [dict(entry) for entry in self.spec.schema]

    @property
    def signaling_url(self) -> str:
        return self.spec.signaling_url

    @property
    def access_modes(self) -> list[str]:
        return list(self.spec.access_modes)

    @property
    def architecture(self) -> dict[str, Any] | None:
        """A model's architecture as its host described it (a module spec without weights)."""
        return None if self.spec.architecture is None else dict(self.spec.architecture)

    @property
    def metrics(self) -> Table:
        """A model's metrics and what backs each: "self-reported", or the host's job receipt
        checked here (signed by this listing's host: which job, when, which outputs)."""
        rows = [
            [_text(m.get("name"), 100), m.get("value"), _text(m.get("dataset", ""), 40),
             _evidence(m, self.host_id)]
            for m in self.spec.metrics
        ]  # fmt: skip
        return Table(["metric", "value", "dataset", "evidence"], rows, index=False,
                     title=f"Metrics of {_text(self.name, 100)}",
                     empty_text="No metrics listed.")  # fmt: skip

    @property
    def rating(self) -> dict[str, Any]:
        """The registry's ``{"count": n, "average": stars or None}``."""
        count, average = self._rating
        return {"count": count, "average": average}

    # -- connecting --------------------------------------------------------------------

    def _join_options(self, identity: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        from duet_p2p.errors import DuetError

        if "live" not in self.spec.access_modes:
            raise DuetError(
                f"host {self.host_id} serves {self.name!r} through offline jobs only: use "
                "listing.submit_job(fn, inputs=..., outputs=..., reason=...)"
            )
        allowed = {"timeout", "ice_servers", "host_addresses", "on_client_id", "channel"}
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"connect() got unexpected arguments {sorted(unknown)}")
        return {"signaling_url": self.spec.signaling_url, "identity": identity, **options}

    def connect(self, identity: Identity | str | None = None, **options: Any) -> Duet:
        """Connect to the listing's standing host: ``sy.join_duet(host_id,
        signaling_url=<the listing's>, identity=...)``; ``options`` are join_duet's
        (``timeout``, ``ice_servers``, ``host_addresses``, ``on_client_id``, ``channel``)."""
        from duet_p2p import duet

        return duet.join_duet(self.host_id, **self._join_options(identity, options))

    async def connect_async(self, identity: Identity | str | None = None, **options: Any) -> Duet:
        """:meth:`connect` on the caller's loop (``sy.join_duet_async``)."""
        from duet_p2p import duet

        return await duet.join_duet_async(self.host_id, **self._join_options(identity, options))

    def submit_job(self, fn: Any, **options: Any) -> Any:
        """``sy.submit_job`` to this listing's host, through its signaling server's mailbox,
        with the host key from the verified listing (so the host may be offline)."""
        from duet_p2p.errors import DuetError
        from duet_p2p.scientist import jobs

        if "offline_jobs" not in self.spec.access_modes:
            raise DuetError(f"host {self.host_id} does not take offline jobs for {self.name!r}")
        options.setdefault("signaling_url", self.spec.signaling_url)
        options.setdefault("host_key", self.spec.host_key)
        return jobs.submit_job(self.host_id, fn, **options)

    # -- mock data ---------------------------------------------------------------------

    def mock(
        self, *, seed: int = 0, rows: int | None = None, max_elements: int = MOCK_MAX_ELEMENTS
    ) -> Any:
        """Synthetic data shaped like the schema, to dry-run code: a pandas DataFrame
        (``rows`` rows, default 20) for a table of columns, or ``{name: torch.Tensor}`` for
        tensors (``rows`` fills an unknown first dimension, default 4). The same seed gives
        the same values; none come from the real data."""
        from duet_p2p.registry.mock import mock_table, mock_tensors, mock_to_pandas

        schema = self.spec.schema
        if not schema:
            raise ValueError(
                f"listing {self.id} ({self.name!r}) describes no schema, so there is nothing to "
                "mock; ask its owner to publish one (host.publish infers it from the data)"
            )
        if not self._of_tensors("a mock is either a table or tensors"):
            return mock_to_pandas(mock_table(schema, rows=20 if rows is None else rows, seed=seed))
        specs = []
        for entry in schema:
            shape = list(entry["shape"])
            if rows is not None and shape and shape[0] == -1:
                shape[0] = rows
            specs.append({"name": entry["name"], "dtype": entry["dtype"], "shape": shape})
        arrays = mock_tensors(specs, seed=seed, max_elements=max_elements)
        return {entry["name"]: _tensor(arrays[entry["name"]], entry["dtype"]) for entry in specs}

    @property
    def has_sample(self) -> bool:
        """Whether the owner published a sample (:meth:`sample`)."""
        return bool(self.spec.sample)

    def sample(self) -> Any:
        """The few records the owner chose to publish with the listing, signed with it and
        held to its schema: a pandas DataFrame for a table of columns (each of its schema
        dtype, missing values as NaN or <NA>; dates and times as text), or
        ``{name: torch.Tensor}`` for tensors. ValueError when the owner published none
        (:meth:`mock` makes data from the schema instead)."""
        from duet_p2p.registry.sample import sample_to_pandas

        spec = self.spec
        if not spec.sample:
            raise ValueError(
                f"the owner of listing {self.id} ({_text(spec.name, 80)!r}) published no "
                "sample; listing.mock() makes synthetic data from its schema"
            )
        if not self._of_tensors("its sample is in listing.spec.sample as lists"):
            return sample_to_pandas(spec.sample, spec.schema)
        return {entry["name"]: _sample_tensor(spec.sample[entry["name"]], entry["dtype"])
                for entry in spec.schema}  # fmt: skip

    def _of_tensors(self, otherwise: str) -> bool:
        """Whether the schema lists tensors (else columns); ValueError if it mixes them."""
        shaped = sum("shape" in entry for entry in self.spec.schema)
        if 0 < shaped < len(self.spec.schema):
            raise ValueError(
                f"listing {self.id} mixes tensors and columns in its schema; {otherwise}"
            )
        return shaped > 0

    # -- the registry ------------------------------------------------------------------

    async def croissant_async(self) -> dict[str, Any]:
        """:meth:`croissant` on the caller's loop."""
        async with _client(self.registry_url, self.timeout) as client:
            return await client.croissant(self)

    def croissant(self) -> dict[str, Any]:
        """The listing's Croissant 1.1 JSON-LD from the registry, checked against the
        signed listing."""
        return _run(self.croissant_async(), self.timeout)  # type: ignore[no-any-return]

    async def request_session_async(
        self,
        proposed: Sequence[datetime | float],
        *,
        minutes: int = 60,
        message: str = "",
        identity: Identity | str | None = None,
    ) -> Session:
        """:meth:`request_session` on the caller's loop."""
        from duet_p2p.registry.session import request_session

        who = _identity(identity)
        signed = request_session(who, self.signed, proposed, minutes=minutes, message=message)
        async with _client(self.registry_url, self.timeout) as client:
            session = await client.request_session(signed)
        session.identity = who
        return session

    def request_session(
        self,
        proposed: Sequence[datetime | float],
        *,
        minutes: int = 60,
        message: str = "",
        identity: Identity | str | None = None,
    ) -> Session:
        """Ask the host's owner for a Duet at one of the ``proposed`` times (datetimes or
        ISO 8601 text, naive ones in your time zone, or unix times; up to 5) lasting
        ``minutes``, signed by your identity; ``message`` is sealed so only the owner reads
        it. The owner answers in their inbox; follow it with ``sy.registry.sessions()``."""
        coro = self.request_session_async(proposed, minutes=minutes, message=message,
                                          identity=identity)  # fmt: skip
        return _run(coro, self.timeout)  # type: ignore[no-any-return]

    async def review_async(
        self, stars: int, text: str = "", *, identity: Identity | str | None = None
    ) -> None:
        """:meth:`review` on the caller's loop."""
        from duet_p2p.registry.review import write_review

        signed = write_review(_identity(identity), self.id, stars, text)
        async with _client(self.registry_url, self.timeout) as client:
            await client.review(signed)

    def review(self, stars: int, text: str = "", *, identity: Identity | str | None = None) -> None:
        """Rate the listing 1 to 5 ``stars`` with an optional ``text``, signed by your
        identity (a later review of yours replaces this one)."""
        _run(self.review_async(stars, text, identity=identity), self.timeout)

    async def reviews_async(self, *, limit: int = 50, offset: int = 0) -> ReviewsList:
        """:meth:`reviews` on the caller's loop."""
        async with _client(self.registry_url, self.timeout) as client:
            found = await client.reviews(self.id, limit=limit, offset=offset)
        return ReviewsList(found)

    def reviews(self, *, limit: int = 50, offset: int = 0) -> ReviewsList:
        """The listing's reviews (each signature verified here), as a table."""
        return _run(self.reviews_async(limit=limit, offset=offset), self.timeout)  # type: ignore[no-any-return]

    async def refresh_async(self) -> Listing:
        async with _client(self.registry_url, self.timeout) as client:
            return await client.get(self.id)

    def refresh(self) -> Listing:
        """The listing as the registry has it now (a newer version, presence, rating)."""
        return _run(self.refresh_async(), self.timeout)  # type: ignore[no-any-return]

    # -- display -----------------------------------------------------------------------

    def _presence(self) -> str:
        if self.online:
            return "online"
        seen = format_local(self.last_seen)
        return f"offline (last seen {seen})" if seen else "offline"

    def _schema_lines(self) -> list[str]:
        lines = []
        for entry in self.spec.schema[:CARD_SCHEMA_ENTRIES]:
            shape = entry.get("shape")
            dims = "" if shape is None else "[" + ", ".join(
                "?" if d == -1 else str(d) for d in shape) + "]"  # fmt: skip
            lines.append(f"{_text(entry['name'], 80)}: {entry['dtype']}{dims}")
        if len(self.spec.schema) > CARD_SCHEMA_ENTRIES:
            lines.append(f"... {len(self.spec.schema) - CARD_SCHEMA_ENTRIES} more")
        return lines

    def __repr__(self) -> str:
        spec = self.spec
        rating = _rating_text(*self._rating)
        lines = [
            f"{_text(spec.name)}  ({spec.kind}, {spec.modality}, {spec.license}, v{spec.version})",
            f"  {_text(spec.summary, 300)}" if spec.summary else "",
            f"  host {spec.host_id}: {self._presence()}" + (f"; rated {rating}" if rating else ""),
            f"  access: {', '.join(spec.access_modes)}; id {spec.listing_id}",
            f"  connects through {_text(spec.signaling_url, 500)} (the owner's signaling server)",
        ]
        schema = self._schema_lines()
        if schema:
            lines.append("  schema: " + "; ".join(schema))
        if self.has_sample:
            lines.append(f"  sample: {self._sample_records()} record(s) from the owner "
                         "(listing.sample())")  # fmt: skip
        return "\n".join(line for line in lines if line)

    def _sample_records(self) -> int:
        from duet_p2p.registry.sample import sample_rows

        return sample_rows(self.spec.sample, self.spec.schema)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        spec = self.spec
        rating = _rating_text(*self._rating)
        badge = "online" if self.online else "offline"
        schema = "".join(f"<li><code>{_esc(line)}</code></li>" for line in self._schema_lines())
        parts = [
            '<div class="duet-listing">',
            f"<h4>{_esc(spec.name)} <small>({_esc(spec.kind)}, {_esc(spec.modality)}, "
            f"{_esc(spec.license)}, v{spec.version})</small></h4>",
            f"<p>{_esc(spec.summary, 600)}</p>" if spec.summary else "",
            f"<p>Host <code>{_esc(spec.host_id)}</code>: <b>{_esc(badge)}</b>"
            f"{_esc(self._presence().removeprefix(badge))}"
            + (f"; rated {_esc(rating)}" if rating else "")
            + "</p>",
            f"<p>Access: {_esc(', '.join(spec.access_modes))}; ID "
            f"<code>{_esc(spec.listing_id)}</code>; connects through "
            f"<code>{_esc(spec.signaling_url, 500)}</code> (the owner's signaling server)</p>",
            f"<p>Schema:</p><ul>{schema}</ul>" if schema else "",
            f"<p>Sample: {self._sample_records()} record(s) from the owner "
            "(<code>listing.sample()</code>)</p>"
            if self.has_sample
            else "",
            "</div>",
        ]
        return "".join(parts)


def _tensor(array: Any, dtype: str) -> Any:
    """A numpy mock as a torch tensor of the listing's dtype (numpy lacks bfloat16)."""
    import torch

    tensor = torch.from_numpy(array)
    target = getattr(torch, dtype)
    return tensor if tensor.dtype == target else tensor.to(target)


def _sample_tensor(values: Any, dtype: str) -> Any:
    """A sample's nested lists as a torch tensor of the listing's dtype."""
    import torch

    return torch.tensor(values, dtype=getattr(torch, dtype))


# -- a page of search results ------------------------------------------------------------


class SearchResults(TableView):
    """A page of verified listings: ``[i]`` (or ``["<listing id>"]``) is a :class:`Listing`;
    ``total`` matches in all (``at_least``: the registry counted to ``total`` and more
    match); ``dropped`` how many the registry sent that failed verification (never shown),
    of them ``rolled_back`` older than (or, same version, other than) a version this machine
    has seen (:mod:`duet_p2p.registry.pins`); ``next_page()``."""

    def __init__(
        self,
        listings: Iterable[Listing],
        *,
        total: int,
        at_least: bool = False,
        dropped: int = 0,
        rolled_back: int = 0,
        query: str = "",
        filters: Mapping[str, Any] | None = None,
        limit: int = 20,
        offset: int = 0,
        returned: int | None = None,
        registry_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.listings = list(listings)
        self.returned = len(self.listings) + dropped if returned is None else returned
        """How many results the registry sent (shown or dropped): the next page starts
        after them (a registry sends fewer than ``limit`` when they are large)."""
        self.total = total
        self.at_least = at_least
        self.dropped = dropped
        self.rolled_back = rolled_back
        self.query = query
        self.filters = dict(filters or {})
        self.limit = limit
        self.offset = offset
        self.registry_url = registry_url
        self.timeout = timeout

    def __len__(self) -> int:
        return len(self.listings)

    def __iter__(self) -> Iterator[Listing]:
        return iter(self.listings)

    def __getitem__(self, key: int | str) -> Listing:
        if isinstance(key, str):
            for listing in self.listings:
                if listing.id == key:
                    return listing
            raise KeyError(f"no listing {printable(key, 64)!r} on this page")
        return self.listings[key]

    def table(self) -> Table:
        rows = [
            [i, _text(x.name, 120), x.kind, x.modality, x.license,
             "yes" if x.online else "no", _rating_text(*x._rating), x.id]
            for i, x in enumerate(self.listings)
        ]  # fmt: skip
        shown = f"{self.offset + 1}-{self.offset + len(self.listings)}" if self.listings else "none"
        about = f" for {self.query!r}" if self.query else ""
        counted = f"{self.total}+" if self.at_least else str(self.total)
        title = f"{counted} listing(s){about} (showing {shown})"
        if self.dropped:
            title += f"; {self.dropped} failed verification and are not shown"
            if self.rolled_back:
                title += f" ({self.rolled_back} older than a version seen before)"
        return Table(["#", "name", "kind", "modality", "license", "online", "rating", "id"],
                     rows, title=_text(title, 300), index=False,
                     empty_text="No listings found.")  # fmt: skip

    def to_pandas(self) -> Any:
        """The page as a pandas DataFrame."""
        return self.table().to_pandas()

    async def next_page_async(self) -> SearchResults:
        """:meth:`next_page` on the caller's loop."""
        offset = self.offset + self.returned
        ended = offset >= self.total and not self.at_least
        if self.returned == 0 or ended or offset > MAX_OFFSET:
            return SearchResults([], total=self.total, query=self.query, filters=self.filters,
                                 limit=self.limit, offset=offset, registry_url=self.registry_url,
                                 timeout=self.timeout)  # fmt: skip
        async with _client(self.registry_url, self.timeout) as client:
            return await client.search(self.query, limit=self.limit, offset=offset,
                                       **self.filters)  # fmt: skip

    def next_page(self) -> SearchResults:
        """The following page of the same search (empty past the last)."""
        return _run(self.next_page_async(), self.timeout)  # type: ignore[no-any-return]


# -- reviews -----------------------------------------------------------------------------


class ReviewsList(TableView):
    """Verified reviews of a listing: stars, text, reviewer (an identity ID), when."""

    def __init__(self, reviews: Iterable[Any]) -> None:
        self.reviews = list(reviews)

    def __len__(self) -> int:
        return len(self.reviews)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.reviews)

    def __getitem__(self, index: int) -> Any:
        return self.reviews[index]

    def table(self) -> Table:
        rows = []
        for signed in self.reviews:
            review = getattr(signed, "review", signed)
            rows.append([review.stars, _text(review.text, 500), review.reviewer_id,
                         format_local(review.at)])  # fmt: skip
        return Table(["stars", "text", "reviewer", "at"], rows, empty_text="No reviews yet.")


# -- sessions ----------------------------------------------------------------------------


class Session:
    """A session request (verified) and the replies to it (verified, checked in order).

    ``status`` and ``start`` are computed here from the signed documents, never taken from
    the registry. Times: ``start``/``proposed`` in UTC, ``start_local``/``proposed_local``
    in this machine's time zone. Acting on it (``withdraw``, ``accept``, ...) signs a reply
    with ``identity`` (given, or your persistent one)."""

    def __init__(
        self,
        request: SignedSessionRequest,
        replies: Sequence[SignedSessionReply] = (),
        *,
        registry_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        identity: Identity | None = None,
    ) -> None:
        self.registry_url = registry_url
        self.timeout = timeout
        self.identity = identity
        self._set(request, replies)

    def _set(self, request: SignedSessionRequest, replies: Sequence[SignedSessionReply]) -> None:
        from duet_p2p.registry.session import session_state

        self.request = request
        self.replies = tuple(replies)
        self.state: SessionState = session_state(request, self.replies)

    # -- what it says ------------------------------------------------------------------

    @property
    def _body(self) -> Any:
        return self.request.request

    @property
    def request_id(self) -> str:
        return self.request.request_id  # type: ignore[no-any-return]

    @property
    def listing_id(self) -> str:
        return self._body.listing_id  # type: ignore[no-any-return]

    @property
    def host_id(self) -> str:
        return self._body.host_id  # type: ignore[no-any-return]

    @property
    def scientist_id(self) -> str:
        return self._body.scientist_id  # type: ignore[no-any-return]

    @property
    def time_zone(self) -> str:
        """The scientist's time zone (as the request says)."""
        return self._body.time_zone  # type: ignore[no-any-return]

    @property
    def status(self) -> str:
        """pending, accepted, declined, proposed (the host proposed other times) or
        withdrawn."""
        return self.state.status

    @property
    def minutes(self) -> int:
        return self.state.minutes

    @property
    def start(self) -> datetime | None:
        """The agreed start (UTC), once accepted."""
        return utc_time(self.state.start)

    @property
    def start_local(self) -> datetime | None:
        """The agreed start in this machine's time zone."""
        return local_time(self.state.start)

    @property
    def proposed(self) -> tuple[datetime, ...]:
        """The times on the table now (UTC): the request's, or the host's counter-proposal."""
        return tuple(utc_time(t) for t in self.state.proposed)  # type: ignore[misc]

    @property
    def proposed_local(self) -> tuple[datetime, ...]:
        return tuple(local_time(t) for t in self.state.proposed)  # type: ignore[misc]

    @property
    def message(self) -> str | None:
        """The newest message the other party sealed to ``identity`` (None without an
        identity or a message to open)."""
        who = self.identity
        if who is None:
            return None
        documents = [(self.request, self._body)] + [
            (reply, getattr(reply, "reply", reply)) for reply in self.replies
        ]
        for signed, body in reversed(documents):
            author = getattr(body, "author_id", None) or getattr(body, "scientist_id", None)
            if author == who.id:
                continue
            try:
                text = signed.open_message(who)
            except Exception:  # noqa: BLE001 - not sealed to this identity, or corrupt
                continue
            if text:
                return printable(text, 2000, multiline=True)
        return None

    # -- acting on it ------------------------------------------------------------------

    async def _reply_async(self, action: str, identity: Identity | str | None,
                           **fields: Any) -> Session:  # fmt: skip
        from duet_p2p.registry.session import reply_session

        who = _identity(identity) if identity is not None else self.identity or _identity(None)
        signed = reply_session(who, self.request, action, replies=self.replies, **fields)
        async with _client(self.registry_url, self.timeout) as client:
            session = await client.reply(signed)
        self._set(session.request, session.replies)
        return self

    def _reply(self, action: str, identity: Identity | str | None, **fields: Any) -> Session:
        return _run(self._reply_async(action, identity, **fields), self.timeout)  # type: ignore[no-any-return]

    def withdraw(self, message: str = "", *, identity: Identity | str | None = None) -> Session:
        """Withdraw your request (as its scientist)."""
        return self._reply("withdraw", identity, message=message)

    def accept(
        self,
        start: datetime | float | None = None,
        *,
        message: str = "",
        identity: Identity | str | None = None,
    ) -> Session:
        """Accept one of the proposed times (``start``; may be left out when only one is
        proposed): the scientist accepts a host's counter-proposal, a host a request."""
        return self._reply("accept", identity, start=self._pick(start), message=message)

    def decline(self, message: str = "", *, identity: Identity | str | None = None) -> Session:
        """Decline the request (as the host)."""
        return self._reply("decline", identity, message=message)

    def propose(
        self,
        times: Sequence[datetime | float],
        message: str = "",
        *,
        identity: Identity | str | None = None,
    ) -> Session:
        """Propose other times (as the host)."""
        return self._reply("propose", identity, proposed=tuple(times), message=message)

    async def refresh_async(self) -> Session:
        """:meth:`refresh` on the caller's loop."""
        who = self.identity if self.identity is not None else _identity(None)
        async with _client(self.registry_url, self.timeout) as client:
            if who.id == self.host_id:
                found = await client.inbox(who)
            else:
                found = await client.sessions(who)
        for session in found:
            if session.request_id == self.request_id:
                self._set(session.request, session.replies)
                return self
        raise RegistryError(f"the registry no longer lists session {self.request_id}",
                            code="not_found")  # fmt: skip

    def refresh(self) -> Session:
        """Fetch the session's replies again (status and start are recomputed)."""
        return _run(self.refresh_async(), self.timeout)  # type: ignore[no-any-return]

    def _pick(self, start: datetime | float | None) -> float:
        proposed = self.state.proposed
        if start is None:
            if len(proposed) != 1:
                raise ValueError(
                    "give start=: one of the proposed times "
                    + ", ".join(format_local(t) for t in proposed)
                )
            return proposed[0]
        if isinstance(start, datetime):
            when = start if start.tzinfo is not None else start.astimezone()
            return when.timestamp()
        return float(start)

    # -- display -----------------------------------------------------------------------

    def _row(self) -> list[object]:
        return [self.listing_id, self.host_id, self.status, format_local(self.state.start),
                ", ".join(format_local(t) for t in self.state.proposed), self.minutes,
                self.request_id]  # fmt: skip

    def __repr__(self) -> str:
        start = format_local(self.state.start)
        when = f" at {start}" if start else ""
        return (f"<Session {self.request_id} with host {self.host_id}: {self.status}{when} "
                f"({self.minutes} min)>")  # fmt: skip


_SESSION_COLUMNS = ["#", "listing", "host", "status", "start (local)", "proposed (local)",
                    "minutes", "request"]  # fmt: skip


class SessionsList(TableView):
    """Session requests, newest first: ``[i]`` or ``["<request id>"]`` is a
    :class:`Session`; times in this machine's time zone."""

    def __init__(self, sessions: Iterable[Session]) -> None:
        self.sessions = list(sessions)

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(self.sessions)

    def __getitem__(self, key: int | str) -> Session:
        if isinstance(key, str):
            for session in self.sessions:
                if session.request_id == key:
                    return session
            raise KeyError(f"no session {printable(key, 64)!r}")
        return self.sessions[key]

    def table(self) -> Table:
        rows = [[i, *session._row()] for i, session in enumerate(self.sessions)]
        return Table(_SESSION_COLUMNS, rows, index=False, empty_text="No session requests.")

    def to_pandas(self) -> Any:
        return self.table().to_pandas()
