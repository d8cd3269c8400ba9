"""The registry's Python client: search listings, verify them, publish, schedule, review.

A registry is an untrusted directory. Every answer is read with a size cap
(:data:`MAX_RESPONSE_BYTES`, in chunks, never trusting a declared length), within a
timeout, and parsed as strict JSON (no duplicate keys, no NaN). Every listing's ``"signed"``
wire is verified here (:meth:`SignedListing.from_wire`) and held to what the registry says
of it (id, host, kind, version, and the search's filters): one that fails is dropped and
counted (``SearchResults.dropped``), never shown. Every verified listing is then held to
this machine's pins (:mod:`duet_p2p.registry.pins`): a version older than one seen before
(a rollback), or the version seen before with other content (equivocation), is dropped
and counted (``SearchResults.rolled_back``) or refused by :meth:`RegistryClient.get`.
Only presence (``online``, ``last_seen``) and ratings are the registry's word. Session
requests, replies and reviews are verified the same way. Refusals and malformed answers
raise :class:`RegistryError`.

:class:`RegistryClient` is async (one ``aiohttp`` session, opened on first use, closed by
:meth:`RegistryClient.close` or ``async with``). The module functions :func:`search`,
:func:`get` and :func:`sessions` are synchronous and notebook-safe (they run on duet_p2p's
background loop, each with a client of its own that is closed before they return);
``*_async`` twins run on the caller's loop. ``DUET_REGISTRY_URL`` names the default registry.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import aiohttp

from duet_p2p.errors import DuetError
from duet_p2p.registry.listing import (
    KINDS,
    MODALITIES,
    InvalidListing,
    SignedDeletion,
    SignedHeartbeat,
    SignedListing,
)
from duet_p2p.registry.pins import Pins, Refusal, default_pins
from duet_p2p.registry.plumbing import (
    DEFAULT_TIMEOUT,
    MAX_OFFSET,
    RegistryError,
    register_client,
    run_sync,
)
from duet_p2p.registry.plumbing import resolve_identity as _identity
from duet_p2p.registry.results import Listing, SearchResults, Session, SessionsList
from duet_p2p.text import printable

if TYPE_CHECKING:
    from duet_p2p.identity import Identity
    from duet_p2p.registry.review import SignedReview
    from duet_p2p.registry.session import SignedSessionReply, SignedSessionRequest

__all__ = [
    "DEFAULT_REGISTRY_ENV", "MAX_RESPONSE_BYTES", "RegistryClient", "RegistryError", "get",
    "get_async", "resolve_url", "run_sync", "search", "search_async", "sessions",
    "sessions_async",
]  # fmt: skip

T = TypeVar("T")

DEFAULT_REGISTRY_ENV = "DUET_REGISTRY_URL"
MAX_TIMEOUT = 600.0
MAX_RESPONSE_BYTES = 4 << 20
"""Largest answer read from a registry (a page of 100 listings fits with room to spare)."""
MAX_LIMIT = 100
MAX_QUERY_CHARS = 500
MAX_FILTER_CHARS = 64
MAX_REVIEWS = 100
MAX_SESSIONS = 500
MAX_REPLIES = 50
MAX_URL_CHARS = 500
MAX_WIRE_CHARS = (1 << 20) + 4096
_HEX32 = re.compile(r"[0-9a-f]{32}")
_CHUNK = 1 << 16
_JSON_TYPE = "application/json"


# -- settings ----------------------------------------------------------------------------


def resolve_url(explicit: str | None = None) -> str:
    """The registry's base URL: ``explicit``, else ``$DUET_REGISTRY_URL``; checked to be an
    http(s) URL with a host (no credentials, query or fragment), without a trailing slash."""
    value = explicit if explicit is not None else os.environ.get(DEFAULT_REGISTRY_ENV)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(
            f"which registry? pass registry_url='http://HOST:PORT' or set {DEFAULT_REGISTRY_ENV}"
        )
    if not isinstance(value, str):
        raise ValueError("registry_url is text, such as 'http://127.0.0.1:8780'")
    value = value.strip()
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        host = None
        parts = None  # type: ignore[assignment]
    if (
        parts is None
        or len(value) > MAX_URL_CHARS
        or parts.scheme not in ("http", "https")
        or not host
        or "@" in parts.netloc
        or parts.query
        or parts.fragment
        or not value.isprintable()
        or " " in value
    ):
        raise ValueError(
            f"registry_url must be an http:// or https:// URL such as 'http://127.0.0.1:8780' "
            f"(a host, optionally a port and a path; no credentials), not {printable(value, 80)!r}"
        )
    return value.rstrip("/")


def _timeout(value: object) -> float:
    if type(value) not in (int, float) or not 0 < value <= MAX_TIMEOUT:  # type: ignore[operator]
        raise ValueError(f"timeout is seconds, more than 0 and at most {MAX_TIMEOUT:g}")
    return float(value)  # type: ignore[arg-type]


def _listing_id(value: object) -> str:
    if type(value) is not str or not _HEX32.fullmatch(value):
        raise ValueError("a listing ID is 32 lower-case hex digits")
    return value


# -- strict JSON -------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number out of range")
    return value


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN or Infinity; ValueError otherwise."""
    try:
        return json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)[:100]) from None


# -- the client --------------------------------------------------------------------------


class RegistryClient:
    """Async client of one registry; ``async with RegistryClient(url) as registry: ...``.

    ``pins``: None (default) holds listings to this machine's pins
    (``<data dir>/registry/pins.sqlite``, opened on first use), a :class:`Pins` to others,
    False to none. Turn them off only where nothing is remembered on purpose: a throwaway
    machine, a test of a registry's raw answers, or a mirror that must show whatever each
    registry serves, knowing an older signed version may then pass."""

    def __init__(
        self,
        registry_url: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        pins: Pins | bool | None = None,
    ) -> None:
        self.url = resolve_url(registry_url)
        self.timeout = _timeout(timeout)
        if type(max_response_bytes) is not int or not 0 < max_response_bytes <= 1 << 30:
            raise ValueError("max_response_bytes is a positive int")
        if not (pins is None or type(pins) is bool or isinstance(pins, Pins)):
            raise TypeError("pins is None (this machine's), a Pins, or False (none)")
        self._max_bytes = max_response_bytes
        self._pins: Pins | None | bool = None if pins is True else pins
        self._session: aiohttp.ClientSession | None = None
        self._public_url: str | None = None

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (idempotent; a later call opens a new one)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    def __repr__(self) -> str:
        return f"<RegistryClient {self.url}>"

    # -- reading -----------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """``GET /api/v1``: the registry's name, API version and public URL."""
        data = await self._json("GET", "/api/v1")
        if (
            type(data) is not dict
            or type(data.get("name")) is not str
            or type(data.get("api")) is not int
            or type(data.get("public_url")) is not str
        ):
            self._malformed("its description (GET /api/v1)")
        try:
            data["public_url"] = resolve_url(data["public_url"])
        except ValueError:
            self._malformed("a public_url that is not an http(s) URL")
        data["name"] = printable(data["name"], 200)
        self._public_url = data["public_url"]
        return data

    async def search(
        self,
        query: str = "",
        *,
        kind: str | None = None,
        modality: str | None = None,
        license: str | None = None,
        keyword: str | None = None,
        online: bool | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> SearchResults:
        """A page of listings matching ``query`` and the filters (``online=True``: hosts
        online now only), each verified."""
        filters = _search_filters(kind, modality, license, keyword, online)
        if type(query) is not str or len(query) > MAX_QUERY_CHARS:
            raise ValueError(f"query is text of at most {MAX_QUERY_CHARS} characters")
        _count(limit, "limit", 1, MAX_LIMIT)
        _count(offset, "offset", 0, MAX_OFFSET)
        params = {"q": query, "limit": str(limit), "offset": str(offset)}
        for name, value in filters.items():
            params[name] = "true" if value is True else value
        data = await self._json("GET", "/api/v1/listings", params=params)
        if type(data) is not dict or type(data.get("results")) is not list:
            self._malformed("search results")
        total = data.get("total")
        if type(total) is not int or total < 0:
            self._malformed("a search total")
        at_least = data.get("total_at_least", False) is True
        items = data["results"]
        if len(items) > limit:
            self._malformed(f"{len(items)} results where at most {limit} were asked")
        verified: list[Listing] = []
        for item in items:
            try:
                listing = self._listing(item)
                _check_filters(listing, filters)
            except (InvalidListing, RegistryError, ValueError, TypeError, KeyError):
                continue
            verified.append(listing)
        refusals = await self._check_pins(verified)
        listings: list[Listing] = []
        seen: set[str] = set()
        for listing, refusal in zip(verified, refusals, strict=True):
            if refusal is None and listing.id not in seen:
                seen.add(listing.id)
                listings.append(listing)
        rolled_back = sum(refusal is not None for refusal in refusals)
        return SearchResults(
            listings, total=max(total, offset + len(items)), at_least=at_least,
            dropped=len(items) - len(listings), rolled_back=rolled_back, query=query,
            filters=filters, limit=limit, offset=offset, returned=len(items),
            registry_url=self.url, timeout=self.timeout,
        )  # fmt: skip

    async def get(self, listing_id: str) -> Listing:
        """One listing by its ID, verified (RegistryError if it does not verify; code
        ``"rolled_back"`` or ``"equivocation"`` if older than, or other than, the version
        this machine has seen)."""
        listing_id = _listing_id(listing_id)
        try:
            data = await self._json("GET", f"/api/v1/listings/{listing_id}")
        except RegistryError as exc:
            if exc.status == 410 and exc.code == "deleted":
                await self._deleted(listing_id, exc.details.get("deletion"))
            raise
        listing = self._verified(data, "the listing")
        if listing.id != listing_id:
            self._forged(f"listing {listing.id} when {listing_id} was asked")
        await self._pinned(listing)
        return listing

    async def _deleted(self, listing_id: str, wire: object) -> NoReturn:
        """A 410's signed deletion: verified, pinned, then RegistryError ``"deleted"``."""
        try:
            if type(wire) is not str or len(wire) > MAX_WIRE_CHARS:
                raise InvalidListing("no signed deletion")
            deletion = SignedDeletion.from_wire(wire.encode())
            deletion.verify()
        except InvalidListing:
            self._forged(f"a deletion of listing {listing_id} that does not verify")
        if deletion.listing_id != listing_id:
            self._forged(f"the deletion of listing {deletion.listing_id} for {listing_id}")
        pins = self._pin_store()
        if pins is not None:
            await asyncio.to_thread(pins.record_deletion, deletion)
        raise RegistryError(
            f"listing {listing_id} was deleted by its host (version {deletion.version}, "
            "signed)", code="deleted", status=410,
        )  # fmt: skip

    async def host(self, host_id: str) -> dict[str, Any]:
        """``GET /api/v1/hosts/{host_id}``: presence and the host's verified listings (those
        that fail, or are another host's, are dropped); ``truncated`` when the registry left
        some out to keep its answer small."""
        host_id = _listing_id(host_id)
        data = await self._json("GET", f"/api/v1/hosts/{host_id}")
        if type(data) is not dict or type(data.get("listings")) is not list:
            self._malformed("a host")
        if len(data["listings"]) > 1000:
            self._malformed("more than 1000 listings for one host")
        online, last_seen = _presence(data)
        verified = []
        for item in data["listings"]:
            try:
                listing = self._listing(item)
            except (InvalidListing, RegistryError, ValueError, TypeError, KeyError):
                continue
            if listing.host_id == host_id:
                verified.append(listing)
        refusals = await self._check_pins(verified)
        listings = [x for x, refusal in zip(verified, refusals, strict=True) if refusal is None]
        return {"host_id": host_id, "online": online, "last_seen": last_seen,
                "listings": listings, "truncated": data.get("truncated") is True}  # fmt: skip

    async def croissant(self, listing: Listing | str) -> dict[str, Any]:
        """The listing's Croissant JSON-LD, checked to be the document its verified
        listing gives (RegistryError when the registry altered it)."""
        from duet_p2p.registry.croissant import croissant_jsonld

        if not isinstance(listing, Listing):
            listing = await self.get(listing)
        data = await self._json("GET", f"/api/v1/listings/{listing.id}/croissant.json")
        if type(data) is not dict or type(data.get("url")) is not str:
            self._malformed("a Croissant document")
        try:
            expected = croissant_jsonld(listing.spec.to_map(), url=data["url"])
        except ValueError:
            self._malformed("a Croissant document with a bad url")
        if parse_json(json.dumps(expected).encode()) != data:
            self._forged("a Croissant document that does not match the signed listing")
        return data

    # -- listings (owners) -------------------------------------------------------------

    async def publish(self, signed: SignedListing) -> Listing:
        """Publish a listing (first version, or an edit); the listing as stored."""
        if not isinstance(signed, SignedListing):
            raise TypeError("publish takes a SignedListing (ListingSpec.sign(identity))")
        data = await self._json("POST", "/api/v1/listings", body=signed.to_wire())
        if type(data) is not dict:
            self._malformed("the published listing")
        listing = self._verified(data.get("listing"), "the published listing")
        if listing.spec != signed.spec:
            self._forged("a listing other than the one published")
        await self._pinned(listing)
        return listing

    async def delete(self, signed: SignedDeletion) -> None:
        """Delete a listing by its host's signed deletion."""
        if not isinstance(signed, SignedDeletion):
            raise TypeError("delete takes a SignedDeletion (SignedDeletion.issue(...))")
        data = await self._json(
            "DELETE", f"/api/v1/listings/{signed.listing_id}", body=signed.to_wire()
        )
        if type(data) is not dict or data.get("deleted") != signed.listing_id:
            self._malformed("the deletion's answer")
        pins = self._pin_store()
        if pins is not None:
            await asyncio.to_thread(pins.record_deletion, signed)

    async def heartbeat(self, signed: SignedHeartbeat) -> float:
        """Send a host's signed heartbeat; the registry's ``last_seen`` for it."""
        if not isinstance(signed, SignedHeartbeat):
            raise TypeError("heartbeat takes a SignedHeartbeat (SignedHeartbeat.issue(...))")
        data = await self._json("POST", "/api/v1/heartbeats", body=signed.to_wire())
        last_seen = data.get("last_seen") if type(data) is dict else None
        if type(last_seen) not in (int, float) or not math.isfinite(last_seen):
            self._malformed("the heartbeat's answer")
        return float(last_seen)

    # -- reviews -----------------------------------------------------------------------

    async def review(self, signed: SignedReview) -> None:
        """Post a signed review (a newer one by the same reviewer replaces the older)."""
        from duet_p2p.registry.review import SignedReview

        if not isinstance(signed, SignedReview):
            raise TypeError("review takes a SignedReview (write_review(...))")
        listing_id = _review_body(signed).listing_id
        data = await self._json(
            "POST", f"/api/v1/listings/{listing_id}/reviews", body=signed.to_wire()
        )
        if type(data) is not dict:
            self._malformed("the review's answer")

    async def reviews(
        self, listing_id: str, *, limit: int = 50, offset: int = 0
    ) -> list[SignedReview]:
        """A page of a listing's reviews, each verified and of that listing (others are
        dropped)."""
        from duet_p2p.registry.review import SignedReview

        listing_id = _listing_id(listing_id)
        _count(limit, "limit", 1, MAX_REVIEWS)
        _count(offset, "offset", 0, MAX_OFFSET)
        params = {"limit": str(limit), "offset": str(offset)}
        data = await self._json("GET", f"/api/v1/listings/{listing_id}/reviews", params=params)
        if type(data) is not dict or type(data.get("results")) is not list:
            self._malformed("reviews")
        if len(data["results"]) > limit:
            self._malformed("more reviews than asked")
        out: list[SignedReview] = []
        for item in data["results"]:
            try:
                signed = SignedReview.from_wire(_wire(item))
                signed.verify()
            except (DuetError, ValueError, TypeError, KeyError):
                continue
            if _review_body(signed).listing_id == listing_id:
                out.append(signed)
        return out

    # -- sessions ----------------------------------------------------------------------

    async def request_session(self, signed: SignedSessionRequest) -> Session:
        """Send a scientist's signed session request to the listing's host inbox."""
        from duet_p2p.registry.session import SignedSessionRequest

        if not isinstance(signed, SignedSessionRequest):
            raise TypeError("request_session takes a SignedSessionRequest (request_session())")
        data = await self._json("POST", "/api/v1/sessions", body=signed.to_wire())
        session = self._session_of(data.get("session") if type(data) is dict else None)
        if session.request_id != signed.request_id:
            self._forged("another session than the one requested")
        return session

    async def reply(self, signed: SignedSessionReply) -> Session:
        """Send a signed reply (accept, decline, propose, withdraw) to a session request."""
        from duet_p2p.registry.session import SignedSessionReply

        if not isinstance(signed, SignedSessionReply):
            raise TypeError("reply takes a SignedSessionReply (reply_session())")
        request_id = _reply_body(signed).request_id
        data = await self._json(
            "POST", f"/api/v1/sessions/{request_id}/replies", body=signed.to_wire()
        )
        session = self._session_of(data.get("session") if type(data) is dict else None)
        if session.request_id != request_id:
            self._forged("another session than the one replied to")
        return session

    async def inbox(self, identity: Identity) -> list[Session]:
        """The session requests addressed to host ``identity`` (newest first)."""
        return await self._sessions(identity, "inbox", "/api/v1/inbox", "host_id")

    async def sessions(self, identity: Identity | str | None = None) -> list[Session]:
        """The session requests scientist ``identity`` made (newest first)."""
        who = _identity(identity)
        return await self._sessions(who, "sessions", "/api/v1/sessions", "scientist_id")

    async def _sessions(self, identity: Identity, purpose: str, path: str,
                        party: str) -> list[Session]:  # fmt: skip
        from duet_p2p.registry.access import SignedAccess

        audience = self._public_url or (await self.info())["public_url"]
        if _origin(audience) != _origin(self.url):
            # an access document names the registry it is for; one naming another registry
            # could be replayed there by this one
            raise RegistryError(
                f"the registry at {self.url} says its public address is {audience}; connect "
                f"to it there (registry_url={audience!r}) to read your sessions",
                code="wrong_audience",
            )
        access = SignedAccess.issue(identity, purpose, audience)
        data = await self._json("GET", path, headers={"X-Duet-Access": access.header()})
        if type(data) is not dict or type(data.get("results")) is not list:
            self._malformed("sessions")
        if len(data["results"]) > MAX_SESSIONS:
            self._malformed(f"more than {MAX_SESSIONS} sessions")
        out: list[Session] = []
        for item in data["results"]:
            try:
                session = self._session_of(item, identity)
            except (DuetError, ValueError, TypeError, KeyError):
                continue
            if getattr(session, party) == identity.id:
                out.append(session)
        return out

    # -- pins --------------------------------------------------------------------------

    def _pin_store(self) -> Pins | None:
        if self._pins is None:
            self._pins = default_pins()
        return self._pins if isinstance(self._pins, Pins) else None

    async def _check_pins(self, listings: list[Listing]) -> list[Refusal | None]:
        """Each verified listing held to its pin (None: accepted, the pin raised)."""
        pins = self._pin_store()
        if pins is None or not listings:
            return [None] * len(listings)
        return await asyncio.to_thread(pins.check, [x.signed for x in listings])

    async def _pinned(self, listing: Listing) -> None:
        """RegistryError (``rolled_back``/``equivocation``) unless the pin accepts it."""
        (refusal,) = await self._check_pins([listing])
        if refusal is not None:
            raise RegistryError(refusal.message(self.url), code=refusal.code)

    # -- parsing -----------------------------------------------------------------------

    def _listing(self, item: object) -> Listing:
        """A LISTING object verified; InvalidListing/RegistryError when it fails."""
        if type(item) is not dict:
            raise InvalidListing("a listing entry is an object")
        signed = SignedListing.from_wire(_wire(item).encode())
        signed.verify()
        spec = signed.spec
        claimed = {"id": spec.listing_id, "host_id": spec.host_id, "kind": spec.kind,
                   "version": spec.version}  # fmt: skip
        for name, value in claimed.items():
            if item.get(name) != value or type(item.get(name)) is not type(value):
                raise InvalidListing(f"the registry's {name} does not match the signed listing")
        online, last_seen = _presence(item)
        rating = _rating(item.get("rating"))
        return Listing(signed, online=online, last_seen=last_seen, rating=rating,
                       registry_url=self.url, timeout=self.timeout)  # fmt: skip

    def _verified(self, item: object, what: str) -> Listing:
        try:
            return self._listing(item)
        except (InvalidListing, ValueError, TypeError, KeyError) as exc:
            self._forged(f"{what}, which does not verify ({printable(str(exc), 200)})")

    def _session_of(self, item: object, identity: Identity | None = None) -> Session:
        """A SESSION object: the request and each reply verified, replies checked in order
        (one that is not allowed is left out), status recomputed here."""
        from duet_p2p.registry.session import (
            SignedSessionReply,
            SignedSessionRequest,
            check_reply,
        )

        if type(item) is not dict:
            self._malformed("a session")
        replies_in = item.get("replies")
        if type(replies_in) is not list or len(replies_in) > MAX_REPLIES:
            self._malformed("a session's replies")
        try:
            request = SignedSessionRequest.from_wire(_wire(item, "request"))
            request.verify()
        except (DuetError, ValueError, TypeError, KeyError) as exc:
            self._forged(f"a session request that does not verify ({printable(str(exc), 200)})")
        body = request.request
        for name in ("request_id", "listing_id", "host_id", "scientist_id"):
            if item.get(name) != getattr(body, name):
                self._forged(f"a session whose {name} does not match its signed request")
        replies: list[Any] = []
        for raw in replies_in:
            try:
                reply = SignedSessionReply.from_wire(_wire({"signed": raw}))
                reply.verify()
                check_reply(request, replies, reply)
            except (DuetError, ValueError, TypeError, KeyError):
                continue
            replies.append(reply)
        return Session(request, replies, registry_url=self.url, timeout=self.timeout,
                       identity=identity)  # fmt: skip

    # -- HTTP --------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Accept": _JSON_TYPE, "Accept-Encoding": "identity"},
                auto_decompress=False,
            )
        return self._session

    async def _json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One exchange: the parsed JSON of a 2xx answer; RegistryError otherwise."""
        sent = dict(headers or {})
        if body is not None:
            sent["Content-Type"] = _JSON_TYPE
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self._get_session().request(
                method, self.url + path, params=params, data=body, headers=sent,
                timeout=timeout, allow_redirects=False,
            ) as resp:  # fmt: skip
                status = resp.status
                raw = await self._read_capped(resp)
        except TimeoutError:
            raise RegistryError(
                f"the registry at {self.url} did not answer within {self.timeout:g} s",
                code="timeout",
            ) from None
        except aiohttp.ClientError as exc:
            raise RegistryError(
                f"cannot reach the registry at {self.url} ({printable(str(exc), 120)}); is it "
                "running, and is the URL right?",
                code="unreachable",
            ) from exc
        try:
            data = parse_json(raw)
        except ValueError:
            if status >= 400:
                raise RegistryError(
                    f"the registry at {self.url} answered HTTP {status}", status=status,
                    code=f"http_{status}",
                ) from None  # fmt: skip
            raise RegistryError(
                f"the registry at {self.url} answered HTTP {status} with a body that is not "
                "JSON; is this URL an OpenGrid registry?",
                code="malformed", status=status,
            ) from None  # fmt: skip
        if not 200 <= status < 300:
            info = data if type(data) is dict else {}
            code = info.get("error")
            code = printable(code, 60) if type(code) is str and code else f"http_{status}"
            said = info.get("message")
            said = printable(said, 500) if type(said) is str and said else "(no message)"
            error = RegistryError(
                f"the registry at {self.url} refused: HTTP {status} {code}: {said}",
                code=code, status=status,
            )  # fmt: skip
            error.details = info
            raise error
        return data

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        cap = self._max_bytes
        if resp.content_length is not None and resp.content_length > cap:
            self._too_large()
        body = bytearray()
        while chunk := await resp.content.read(_CHUNK):
            body += chunk
            if len(body) > cap:
                self._too_large()
        return bytes(body)

    def _too_large(self) -> NoReturn:
        raise RegistryError(
            f"the registry at {self.url} sent an answer larger than {self._max_bytes} bytes; "
            "refused",
            code="too_large",
        )

    def _malformed(self, what: str) -> NoReturn:
        raise RegistryError(f"the registry at {self.url} sent malformed {what}", code="malformed")

    def _forged(self, what: str) -> NoReturn:
        raise RegistryError(
            f"the registry at {self.url} sent {what}: refused (an altered or forged document)",
            code="forged",
        )


# -- checks of what a registry says ------------------------------------------------------


def _wire(item: Mapping[str, Any], key: str = "signed") -> str:
    value = item.get(key)
    if type(value) is not str or not 0 < len(value) <= MAX_WIRE_CHARS:
        raise InvalidListing(f"{key!r} is a signed document's wire text")
    return value


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _presence(item: Mapping[str, Any]) -> tuple[bool, float | None]:
    online = item.get("online")
    last_seen = item.get("last_seen")
    if type(online) is not bool:
        raise InvalidListing("online is true or false")
    if last_seen is not None and (
        type(last_seen) not in (int, float) or not math.isfinite(last_seen) or last_seen < 0
    ):
        raise InvalidListing("last_seen is a time or null")
    return online, None if last_seen is None else float(last_seen)


def _rating(value: object) -> tuple[int, float | None]:
    if value is None:
        return 0, None
    if type(value) is not dict:
        raise InvalidListing("rating is an object")
    count, average = value.get("count"), value.get("average")
    if type(count) is not int or count < 0:
        raise InvalidListing("a rating's count is an int >= 0")
    if average is not None and (type(average) not in (int, float) or not 1 <= average <= 5):
        raise InvalidListing("a rating's average is 1 to 5 stars, or null")
    if (count == 0) != (average is None):
        raise InvalidListing("a rating has an average exactly when it has reviews")
    return count, None if average is None else float(average)


def _count(value: object, what: str, least: int, most: int) -> int:
    if type(value) is not int or not least <= value <= most:
        raise ValueError(f"{what} is an int from {least} to {most}")
    return value


def _search_filters(
    kind: object, modality: object, license: object, keyword: object, online: object
) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    for name, value, allowed in (
        ("kind", kind, KINDS), ("modality", modality, MODALITIES), ("license", license, None),
        ("keyword", keyword, None),
    ):  # fmt: skip
        if value is None:
            continue
        if type(value) is not str or not 0 < len(value) <= MAX_FILTER_CHARS:
            raise ValueError(f"{name} is text of 1 to {MAX_FILTER_CHARS} characters")
        if allowed is not None and value not in allowed:
            raise ValueError(f"{name} is one of {list(allowed)}")
        filters[name] = value
    if online is not None and type(online) is not bool:
        raise ValueError("online is True (hosts online now only), False or None (any)")
    if online:
        filters["online"] = True
    return filters


def _check_filters(listing: Listing, filters: Mapping[str, Any]) -> None:
    """InvalidListing when a verified listing does not meet the filters asked for (a
    registry that answers with other listings than asked is lying)."""
    spec = listing.spec
    for name in ("kind", "modality", "license"):
        if name in filters and getattr(spec, name) != filters[name]:
            raise InvalidListing(f"the listing's {name} is not the one asked for")
    if "keyword" in filters:
        wanted = filters["keyword"].casefold()
        if not any(word.casefold() == wanted for word in spec.keywords):
            raise InvalidListing("the listing lacks the keyword asked for")
    if filters.get("online") and not listing.online:
        raise InvalidListing("the listing's presence is not the one asked for")


def _review_body(signed: Any) -> Any:
    return getattr(signed, "review", signed)


def _reply_body(signed: Any) -> Any:
    return getattr(signed, "reply", signed)


# -- the synchronous API -----------------------------------------------------------------


async def using(url: str | None, timeout: float, action: Callable[[RegistryClient],
                Awaitable[T]]) -> T:  # fmt: skip
    """``action(client)`` with a client of its own, closed afterwards."""
    async with RegistryClient(url, timeout=timeout) as client:
        return await action(client)


async def search_async(
    query: str = "",
    *,
    registry_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    **filters: Any,
) -> SearchResults:
    """:func:`search` on the caller's loop."""
    return await using(registry_url, timeout, lambda c: c.search(query, **filters))


def search(
    query: str = "",
    *,
    registry_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    **filters: Any,
) -> SearchResults:
    """Search a registry (``registry_url``, default ``$DUET_REGISTRY_URL``) for datasets
    and models: ``query`` words plus filters ``kind`` ("dataset"/"model"), ``modality``,
    ``license``, ``keyword``, ``online``, ``limit`` (≤ 100), ``offset``. Returns a table of
    verified listings (``[i]`` is a :class:`Listing`; ``.to_pandas()``, ``.next_page()``)."""
    return run_sync(search_async(query, registry_url=registry_url, timeout=timeout, **filters),
                    _timeout(timeout))  # fmt: skip


async def get_async(
    listing_id: str, *, registry_url: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Listing:
    """:func:`get` on the caller's loop."""
    return await using(registry_url, timeout, lambda c: c.get(listing_id))


def get(
    listing_id: str, *, registry_url: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Listing:
    """One listing by its ID, verified."""
    return run_sync(get_async(listing_id, registry_url=registry_url, timeout=timeout),
                    _timeout(timeout))  # fmt: skip


async def sessions_async(
    *,
    identity: Identity | str | None = None,
    registry_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> SessionsList:
    """:func:`sessions` on the caller's loop."""
    who = _identity(identity)
    found = await using(registry_url, timeout, lambda c: c.sessions(who))
    return SessionsList(found)


def sessions(
    *,
    identity: Identity | str | None = None,
    registry_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> SessionsList:
    """The session requests you made (as ``identity``, default your persistent one), with
    the hosts' answers and agreed times in your time zone."""
    return run_sync(
        sessions_async(identity=identity, registry_url=registry_url, timeout=timeout),
        _timeout(timeout),
    )


register_client(lambda url, timeout: RegistryClient(url, timeout=timeout))
