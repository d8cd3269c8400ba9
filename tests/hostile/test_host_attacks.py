"""Attacks on a standing host: a hostile scientist among others, a hostile signaling server,
a stranger who knows the Host ID, and another local user.

Each test asserts the safe behaviour against one attack (the note beside it says which).
The host runs on duet_p2p's background
loop (``launch_host_async`` through the runtime), scientists join over real WebRTC on
loopback, and the signaling server is the session's real one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import duet_p2p as sy
from duet_p2p.connect import ConnectOptions
from duet_p2p.connect_host import HostListener, join_host
from duet_p2p.errors import (
    ConfigurationError,
    ConnectionTimeout,
    DuetError,
    PeerVerificationError,
    RequestTimeout,
)
from duet_p2p.host import host as host_module
from duet_p2p.identity import Identity, SessionBinding, fresh_nonce
from duet_p2p.limits import OwnerLimits
from duet_p2p.runtime import get_runtime
from duet_p2p.signaling import SignalingClient
from duet_p2p.transport.peer import new_peer_connection
from signaling_server.hosts import MAX_CHALLENGES, HostRegistry
from tests.conftest import wait_for

WAIT = 15.0
RUNTIME = get_runtime()
FINGERPRINT = ":".join(["AB"] * 32)
FAKE_SDP = (
    f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=fingerprint:sha-256 {FINGERPRINT}\r\n"
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
)
"""An offer the host never has to parse (it is held for admission or refused first)."""


# -- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def standing_host(url: str, tmp_path: Path, **options: Any) -> Iterator[sy.Host]:
    options.setdefault("admit", "any")
    host = RUNTIME.run(
        sy.launch_host_async(url, name="lab", data_dir=tmp_path / "home", **options), timeout=90
    )
    try:
        yield host
    finally:
        host.close()


@contextlib.contextmanager
def scientist(url: str, host: sy.Host, identity: Identity | None = None) -> Iterator[sy.Duet]:
    duet = sy.join_duet(host.id, url, identity=identity or Identity.generate(), timeout=WAIT)
    try:
        yield duet
    finally:
        duet.close()


def leave(duet: sy.Duet, host: sy.Host) -> None:
    duet.close()
    assert wait_for(lambda: duet.client_id not in host.connected(), WAIT)


async def post_offer(url: str, host_id: str, who: Identity, sdp: str = FAKE_SDP) -> str:
    """A correctly signed offer from ``who``, posted as a scientist would."""
    client = SignalingClient(url)
    try:
        nonce = fresh_nonce()
        signature = who.sign(SessionBinding.for_sdp("scientist", host_id, nonce, sdp))
        return await client.post_host_offer(
            host_id, sdp=sdp, client_id=who.id, public_key=who.public_key, nonce=nonce,
            signature=signature,
        )  # fmt: skip
    finally:
        await client.close()


async def answer_of(url: str, host_id: str, offer_id: str, timeout: float) -> dict | None:
    """The host's answer or refusal to an offer, or None if none came within ``timeout``."""
    client = SignalingClient(url)
    try:
        return await client.wait_host_answer(host_id, offer_id, timeout)
    except ConnectionTimeout:
        return None
    finally:
        await client.close()


def ready(host: sy.Host, count: int) -> bool:
    requests = host.requests.all()
    return len(requests) >= count and all(r.ready for r in requests)


# -- (a) a hostile scientist among others ------------------------------------------------------


def test_another_scientists_requests_and_objects_are_out_of_reach(signaling_url, tmp_path):
    with standing_host(signaling_url, tmp_path) as host:
        host.send(torch.arange(10.0), tags=["ages"])
        with scientist(signaling_url, host) as alice, scientist(signaling_url, host) as mallory:
            total = alice.store["ages"].sum()
            handle = total.get(request_block=False)
            rid = handle.request_id
            assert wait_for(lambda: ready(host, 1), WAIT)
            core = mallory._core
            # Mallory names Alice's request: cancel, fetch, list.
            core.sync(core.cancel(rid))
            assert rid not in {r.request_id for r in mallory.requests}
            with pytest.raises(DuetError, match="no request"):
                core.sync(core.fetch_release(rid, None, 5.0))
            assert host.requests[rid].pending
            # Mallory names Alice's object: get it, free it.
            with pytest.raises(DuetError, match="no object"):
                core.sync(core.request(total.id, "mine now"))
            core.release(total.id)
            core.sync(core.flush(deletes=True))
            # Mallory tries to free the hosted object itself.
            core.release(mallory.store["ages"].id)
            core.sync(core.flush(deletes=True))
            assert len(mallory.requests) == 0
            host.requests[rid].accept()
            assert handle.result(WAIT) == 45.0
            # Accepted now, and still not Mallory's to fetch.
            with pytest.raises(DuetError, match="no request"):
                core.sync(core.fetch_release(rid, None, 5.0))
            # The hosted object still serves Alice; her list is hers.
            assert alice.store["ages"].sum().get(request_block=False).wait(0.3) == "pending"
            assert [r.request_id for r in alice.requests][-1] == rid


def test_a_kept_value_is_fetched_only_once_and_only_if_accepted(signaling_url, tmp_path):
    me = Identity.generate()
    with standing_host(signaling_url, tmp_path) as host:
        host.send(torch.arange(10.0), tags=["ages"])
        with scientist(signaling_url, host, me) as first:
            ages = first.store["ages"]
            rids = [ages.sum().get(request_block=False).request_id for _ in range(3)]
            assert wait_for(lambda: ready(host, 3), WAIT)
            leave(first, host)
        denied, accepted, waiting = rids
        host.requests[denied].deny("no")
        host.requests[accepted].accept()
        with scientist(signaling_url, host, me) as again:
            mine = again.requests
            assert {r.request_id: r.status for r in mine} == {
                denied: "denied", accepted: "accepted", waiting: "pending"
            }  # fmt: skip
            with pytest.raises(sy.PermissionDenied):
                mine[denied].get(timeout=5)
            with pytest.raises(RequestTimeout):
                mine[waiting].get(timeout=5)
            assert mine[accepted].get(timeout=WAIT) == 45.0
            with pytest.raises(DuetError, match="already fetched"):
                mine[accepted].get(timeout=5)


def test_a_dp_query_left_undecided_is_withdrawn_and_never_released(signaling_url, tmp_path):
    me = Identity.generate()
    rng = np.random.default_rng(1)
    table = torch.tensor(np.c_[rng.uniform(20, 80, 200), rng.integers(0, 2, 200)])
    with standing_host(signaling_url, tmp_path) as host:
        host.send(table, tags=["ages"], columns=["age", "sex"])
        host.dp.set_budget("ages", epsilon=1.0)
        with scientist(signaling_url, host, me) as first:
            first.dp.mean("ages", "age", bounds=(0, 100), epsilon=0.5, request_block=False)
            assert wait_for(lambda: ready(host, 1), WAIT)
            rid = host.requests[0].request_id
            first.close()
        assert wait_for(lambda: host.requests[rid].status.value == "expired", WAIT)
        with pytest.raises(DuetError):
            host.requests[rid].accept()
        with scientist(signaling_url, host, me) as again:
            with pytest.raises(RequestTimeout, match="expired"):
                again.requests[rid].get(timeout=5)
        assert host.dp.ledger.debits() == []


def test_a_departed_scientists_values_are_not_kept_in_memory(signaling_url, tmp_path):
    # Attack: connect, ask, leave, repeat. A closed session lets go of the values it held
    # for its pending requests (previews then read the host's journal), so memory stays flat.
    value = torch.arange(65536.0)
    with standing_host(signaling_url, tmp_path) as host:
        host.send(value, tags=["big"])
        with scientist(signaling_url, host) as mallory:
            mallory.store["big"].get(request_block=False)
            assert wait_for(lambda: ready(host, 1), WAIT)
            session = host._sessions[mallory.client_id]
            leave(mallory, host)
        assert session.held_bytes == 0 and not session._held
        assert torch.equal(host.requests[0].preview(), value)  # read back from the journal


def test_reconnecting_does_not_grow_the_values_kept_on_disk(signaling_url, tmp_path):
    # Attack: reconnect to start each session's budget at 0. The values the journal keeps for
    # one scientist's pending requests stay within max_pending_bytes over all their sessions.
    cap = 400_000
    me = Identity.generate()
    limits = OwnerLimits(max_pending_bytes=cap)
    with standing_host(signaling_url, tmp_path, limits=limits) as host:
        host.send(torch.arange(65536.0), tags=["big"])  # 256 KiB a copy
        for round_ in (1, 2):
            with scientist(signaling_url, host, me) as mallory:
                mallory.store["big"].get(request_block=False)
                assert wait_for(lambda n=round_: ready(host, n), WAIT)
                leave(mallory, host)
        kept = [host.state.payload(r.request_id) for r in host.state.for_client(me.id)]
        assert sum(len(p) for p in kept if p is not None) <= cap


def test_the_journal_forgets_old_decided_requests(signaling_url, tmp_path):
    # Attack: grow state.sqlite with gets cancelled at once. The journal keeps at most
    # max_requests of each scientist's requests, so nobody pushes out another's history.
    with standing_host(signaling_url, tmp_path, limits=OwnerLimits(max_requests=10)) as host:
        host.send(torch.arange(4.0), tags=["t"])
        with scientist(signaling_url, host) as mallory:
            pointer, core = mallory.store["t"], mallory._core
            for _ in range(25):
                core.sync(core.cancel(pointer.get(request_block=False).request_id))
            assert wait_for(lambda: len(host.requests) == 0 and ready(host, 1), WAIT)
        assert len(host.requests.all()) <= 10

        # the journal's writer prunes behind the last write it was queued; what it keeps
        # beyond max_requests can only be requests still holding a value (bounded by the
        # pending caps), never decided ones
        def decided() -> list[Any]:
            return [r for r in host.state.all_requests(limit=1000)
                    if r.status != "pending" and not r.has_value]  # fmt: skip

        assert wait_for(lambda: len(decided()) <= 10, WAIT), [
            (r.status, r.decided_by, r.has_value) for r in host.state.all_requests(limit=1000)
        ]
        assert (
            len(host.state.all_requests(limit=1000)) <= 10 + OwnerLimits().max_pending_per_scientist
        )


def test_journal_writes_and_reads_run_off_the_hosts_event_loop(
    signaling_url, tmp_path, monkeypatch
):
    # Attack: stall every scientist with one large get. Journal reads and writes (fsynced,
    # a held value may be a GiB) run off the event loop that serves everyone.
    with standing_host(signaling_url, tmp_path) as host:
        host.send(torch.arange(4.0), tags=["t"])
        on_loop: list[str] = []
        for name in ("record_request", "hold", "delivered", "for_client"):
            monkeypatch.setattr(host.state, name, _spy(getattr(host.state, name), name, on_loop))
        with scientist(signaling_url, host) as alice:
            handle = alice.store["t"].get(request_block=False)
            assert wait_for(lambda: ready(host, 1), WAIT)
            host.requests[0].accept()
            assert torch.equal(handle.result(WAIT), torch.arange(4.0))
            assert len(alice.requests) == 1
        assert on_loop == []


def _spy(call: Any, name: str, on_loop: list[str]) -> Any:
    """``call``, noting ``name`` whenever it runs on duet_p2p's event-loop thread."""

    def spy(*args: Any, **kwargs: Any) -> Any:
        if RUNTIME.in_loop_thread():
            on_loop.append(name)
        return call(*args, **kwargs)

    return spy


def test_one_scientist_cannot_fill_the_pending_queue_for_everyone(signaling_url, tmp_path):
    # Attack: fill the shared pending queue. One scientist may hold at most half of it (and
    # max_pending_per_scientist), so another's request still waits for the owner.
    with standing_host(signaling_url, tmp_path) as host:
        host.send(torch.arange(10.0), tags=["ages"])
        host.owner.requests.max_pending = 3
        with scientist(signaling_url, host) as mallory, scientist(signaling_url, host) as alice:
            flood = mallory.store["ages"]
            for _ in range(4):  # until the host refuses Mallory more, whatever its caps
                if flood.sum().get(request_block=False).wait(0.3) == "denied":
                    break
            assert alice.store["ages"].sum().get(request_block=False).wait(0.5) == "pending"


def test_one_scientist_cannot_take_every_connecting_slot(signaling_url, tmp_path):
    # Attack: an admitted scientist posts signed offers it never completes, to hold every
    # connecting slot. One connection attempt per Client ID at a time.
    with standing_host(signaling_url, tmp_path, max_scientists=2, timeout=8) as host:
        mallory = Identity.generate()

        async def half_open() -> list[Any]:
            pcs = []
            for _ in range(2):
                pc, _channel = new_peer_connection([])
                await pc.setLocalDescription(await pc.createOffer())
                pcs.append(pc)
                offer_id = await post_offer(
                    signaling_url, host.id, mallory, pc.localDescription.sdp
                )
                await answer_of(signaling_url, host.id, offer_id, WAIT)  # never applied
            return pcs

        async def close(pcs: list[Any]) -> None:
            await asyncio.gather(*(pc.close() for pc in pcs))

        pcs = RUNTIME.run(half_open(), timeout=40)
        try:
            with scientist(signaling_url, host) as alice:
                assert alice.client_id in host.connected()
        finally:
            RUNTIME.run(close(pcs), timeout=10)


# -- (d) a stranger who knows the Host ID -------------------------------------------------------


def test_strangers_who_left_do_not_lock_newcomers_out(signaling_url, tmp_path, monkeypatch):
    # Attack: throw-away keys fill the pending admissions. An admission is pending only
    # while its offer waits, so strangers who left do not lock newcomers out.
    monkeypatch.setattr(host_module, "ADMISSION_WAIT", 0.5)
    with standing_host(signaling_url, tmp_path, admit="ask", max_pending_admissions=2) as host:

        async def strangers() -> list[dict | None]:
            offers = [await post_offer(signaling_url, host.id, Identity.generate())
                      for _ in range(2)]  # fmt: skip
            return [await answer_of(signaling_url, host.id, o, WAIT) for o in offers]

        replies = RUNTIME.run(strangers(), timeout=40)
        assert all(r is not None and r["type"] == "refusal" for r in replies)
        newcomer = Identity.generate()
        RUNTIME.run(post_offer(signaling_url, host.id, newcomer), timeout=10)
        assert wait_for(lambda: newcomer.id in {a.client_id for a in host.admission.pending()}, 5)


def test_one_stranger_holds_at_most_one_offer_waiting_for_admission(signaling_url, tmp_path):
    # Attack: many offers of one unknown key, each held for admission, fill the server's
    # max_offers_per_host. Only the newest offer of a Client ID waits; older ones are refused.
    with standing_host(signaling_url, tmp_path, admit="ask") as host:
        stranger = Identity.generate()

        async def flood() -> list[dict | None]:
            offers = [await post_offer(signaling_url, host.id, stranger) for _ in range(3)]
            return list(
                await asyncio.gather(*(answer_of(signaling_url, host.id, o, 4) for o in offers))
            )

        replies = RUNTIME.run(flood(), timeout=30)
        assert sum(r is not None for r in replies) >= 2
        assert [a.client_id for a in host.admission.pending()] == [stranger.id]


async def test_a_challenge_flood_cannot_keep_a_host_offline() -> None:
    # Attack: flood POST /challenge for the host's ID so its own challenge is evicted.
    # Challenges are stateless (a MAC and an expiry), so nothing can be evicted.
    registry = HostRegistry(60.0)
    host_id = "ab" * 16
    own = await registry.new_challenge(host_id)
    for _ in range(MAX_CHALLENGES):
        await registry.new_challenge(host_id)
    assert await registry.take_challenge(host_id, own)


# -- (b) a hostile signaling server -------------------------------------------------------------


def test_host_refuses_forged_and_replayed_offers() -> None:
    host_identity, alice, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    options = ConnectOptions.resolve("http://127.0.0.1:9", [], ["127.0.0.1"], 5.0, None)

    async def never(_offer: Any) -> None:
        raise AssertionError("no offer is dispatched here")

    listener = HostListener(host_identity, options, never)

    def raw(signer: Identity, *, host_id: str = host_identity.id, sdp: str = FAKE_SDP) -> dict:
        nonce = fresh_nonce()
        return {
            "offer_id": "cd" * 16, "sdp": sdp, "client_id": signer.id,
            "public_key": signer.public_key, "nonce": nonce, "age": 0.0,
            "signature": signer.sign(SessionBinding.for_sdp("scientist", host_id, nonce, sdp)),
        }  # fmt: skip

    good = raw(alice)
    assert listener._verified(dict(good)).client_id == alice.id
    refused = [
        {**good, "offer_id": "ef" * 16},  # the same offer again, under another offer ID
        {**raw(mallory), "client_id": alice.id},  # Alice's ID, Mallory's key
        {**raw(mallory), "client_id": alice.id, "public_key": alice.public_key},  # her sig
        {**raw(alice), "sdp": FAKE_SDP.replace("AB:AB", "CD:AB", 1)},  # another certificate
        raw(alice, host_id=mallory.id),  # signed for another host
    ]
    for offer in refused:
        with pytest.raises(PeerVerificationError):
            listener._verified(offer)
    RUNTIME.run(listener.close(), timeout=5)


def test_scientist_refuses_a_substituted_host_answer(signaling_url, tmp_path):
    mallory = Identity.generate()

    class Substituting(SignalingClient):
        """Relays honestly, except the host's answer: ``how`` rewrites it."""

        def __init__(self, how: str) -> None:
            super().__init__(signaling_url)
            self.how = how
            self.nonce = b""
            self.client_id = ""

        async def post_host_offer(self, host_id: str, **offer: Any) -> str:
            self.nonce, self.client_id = offer["nonce"], offer["client_id"]
            return await super().post_host_offer(host_id, **offer)

        async def wait_host_answer(self, host_id: str, offer_id: str, timeout: float) -> dict:
            reply = await super().wait_host_answer(host_id, offer_id, timeout)
            if self.how == "key":  # Mallory's key, signing this very connection
                binding = SessionBinding.for_sdp("host", self.client_id, self.nonce, reply["sdp"])
                reply.update(public_key=mallory.public_key, signature=mallory.sign(binding))
            else:  # the host's signature over another certificate's answer
                line = next(s for s in reply["sdp"].splitlines() if "sha-256" in s)
                other = line[:-2] + ("00" if not line.endswith("00") else "11")
                reply["sdp"] = reply["sdp"].replace(line, other)
            return reply

    with standing_host(signaling_url, tmp_path) as host:
        options = ConnectOptions.resolve(signaling_url, [], ["127.0.0.1"], 10.0, None)
        for how, caught in (("key", "does not belong"), ("sdp", "does not cover")):
            client = Substituting(how)
            try:
                with pytest.raises(PeerVerificationError, match=caught):
                    RUNTIME.run(join_host(host.id, options, Identity.generate(), client=client), 30)
            finally:
                RUNTIME.run(client.close(), timeout=5)
        assert host.connected() == []


# -- (c) another local user ---------------------------------------------------------------------


def test_an_identity_in_a_directory_others_may_write_is_refused(tmp_path):
    # Attack: replace a host's key in an identity directory others may write. Such a
    # directory is refused.
    shared = tmp_path / "identities"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigurationError):
        Identity.load("host", directory=shared)


def test_an_identity_key_that_is_a_symlink_is_refused(tmp_path):
    # Attack: plant a symlink where the key file is expected. Keys are opened with
    # O_NOFOLLOW and must be regular files.
    folder = tmp_path / "identities"
    Identity.load("scientist", directory=folder)
    (folder / "host.key").symlink_to(folder / "scientist.key")
    with pytest.raises(ConfigurationError):
        Identity.load("host", directory=folder)
