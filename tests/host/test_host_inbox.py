"""The host's inbox: session requests scientists send through a registry, opened and
answered by the owner (``host.inbox``, and ``duet-host inbox`` through the control socket).

A real registry on 127.0.0.1; scientists are identities using the registry client.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from duet_p2p.errors import DuetError
from duet_p2p.host.admin import HostAdmin
from duet_p2p.host.cli import main
from duet_p2p.host.control import ControlServer
from duet_p2p.host.host import Host
from duet_p2p.host.inbox_view import format_local
from duet_p2p.host.registry_link import RegistryAdmin
from duet_p2p.identity import Identity
from duet_p2p.registry.client import RegistryClient
from duet_p2p.registry.listing import SignedListing
from duet_p2p.registry.results import Session
from duet_p2p.registry.session import request_session
from duet_p2p.runtime import get_runtime
from tests.host.test_host_publish import quiet_host, running_registry

RUNTIME = get_runtime()
EVIL = "hi\x1b]0;owned\x07\x1b[2J\u202eevil\r\nnext line"


def hour(n: int) -> float:
    """A whole minute ``n`` hours from now (UTC epoch seconds)."""
    return float((int(time.time()) // 60 + 60 * n) * 60)


def ask_session(url: str, who: Identity, listing: SignedListing, times: list[float],
                message: str = "", minutes: int = 30) -> Session:  # fmt: skip
    signed = request_session(who, listing, times, minutes=minutes, message=message,
                             time_zone="Asia/Tokyo")  # fmt: skip

    async def send() -> Session:
        async with RegistryClient(url, timeout=10) as client:
            return await client.request_session(signed)

    return RUNTIME.run(send(), timeout=30)


def sessions_of(url: str, who: Identity) -> list[Session]:
    async def read() -> list[Session]:
        async with RegistryClient(url, timeout=10) as client:
            return await client.sessions(who)

    return RUNTIME.run(read(), timeout=30)


@pytest.fixture
def published(tmp_path: Path) -> Iterator[tuple[str, Host, SignedListing]]:
    with running_registry(tmp_path) as registry, quiet_host(tmp_path) as host:
        host.send(torch.ones(3), tags=["ages"])
        listing = host.publish("ages", registry_url=registry.url, name="Ages", license="MIT")
        yield registry.url, host, listing.signed


def test_a_request_shows_opened_and_accepting_reaches_the_scientist(
    published: tuple[str, Host, SignedListing],
) -> None:
    url, host, listing = published
    alice = Identity.generate()
    assert len(host.inbox) == 0
    times = [hour(2), hour(3)]
    ask_session(url, alice, listing, times, "Could we look at ages by ward?", minutes=45)
    inbox = host.inbox
    assert len(inbox) == 1 and inbox.note is None
    entry = inbox[0]
    assert (entry.listing_name, entry.scientist_id, entry.status, entry.minutes) == (
        "Ages", alice.id, "pending", 45)  # fmt: skip
    assert entry.message == "Could we look at ages by ward?"
    assert entry.proposed == tuple(times) and entry.time_zone == "Asia/Tokyo"
    assert [t.timestamp() for t in entry.proposed_local] == times
    assert entry.proposed_local[0].utcoffset() == entry.proposed_local[0].astimezone().utcoffset()
    text = str(inbox)
    assert entry.request_id in text and format_local(times[0]) in text and "ward" in text
    assert inbox[entry.request_id] is entry and len(inbox.pending) == 1
    accepted = entry.accept()
    assert (accepted.status, accepted.start) == ("accepted", times[0])
    mine = sessions_of(url, alice)
    assert [(s.status, s.state.start) for s in mine] == [("accepted", times[0])]
    again = host.inbox[0]
    assert again.status == "accepted" and again.start_local is not None
    assert again.start_local.timestamp() == times[0]
    with pytest.raises(DuetError, match="only a pending one"):
        again.accept()


def test_accept_a_chosen_time_decline_and_propose(
    published: tuple[str, Host, SignedListing],
) -> None:
    url, host, listing = published
    bob, carol, dave = Identity.generate(), Identity.generate(), Identity.generate()
    times = [hour(5), hour(6), hour(7)]
    ask_session(url, bob, listing, times, "first")
    ask_session(url, carol, listing, times[:1], "second")
    ask_session(url, dave, listing, times[:1], "third")
    inbox = host.inbox
    by = {entry.scientist_id: entry for entry in inbox}
    assert [e.message for e in inbox] == ["third", "second", "first"]  # newest first
    with pytest.raises(DuetError, match="proposed times"):
        by[bob.id].accept(hour(9))
    assert by[bob.id].accept(times[1]).start == times[1]
    declined = by[carol.id].decline("we are closed that week")
    assert declined.status == "declined"
    (carol_session,) = sessions_of(url, carol)
    carol_session.identity = carol
    assert carol_session.status == "declined"
    assert carol_session.message == "we are closed that week"
    proposed = by[dave.id].propose([hour(30), hour(31)], "mornings suit us")
    assert proposed.status == "proposed" and proposed.proposed == (hour(30), hour(31))
    (dave_session,) = sessions_of(url, dave)
    dave_session.accept(hour(31), identity=dave)
    final = host.inbox[dave_session.request_id]
    assert (final.status, final.start) == ("accepted", hour(31))


def sealed_raw(text: str, key: bytes) -> bytes:
    """``text`` sealed to ``key`` without the sender's checks (what a hostile client sends)."""
    from nacl.bindings import crypto_sign_ed25519_pk_to_curve25519
    from nacl.public import PublicKey, SealedBox

    return SealedBox(PublicKey(crypto_sign_ed25519_pk_to_curve25519(key))).encrypt(text.encode())


def hostile_request(
    who: Identity, listing: SignedListing, message: str, times: tuple[float, ...] = ()
) -> Any:
    import os

    from duet_p2p.registry.session import (
        REQUEST_CONTEXT,
        SessionRequest,
        SignedSessionRequest,
        sign_body,
    )

    spec = listing.spec
    request = SessionRequest(
        request_id=os.urandom(16).hex(), listing_id=spec.listing_id, host_id=spec.host_id,
        host_key=spec.host_key, scientist_id=who.id, scientist_key=who.public_key,
        proposed=times or (hour(2),), minutes=30, time_zone="UTC",
        sealed_message=sealed_raw(message, spec.host_key), at=time.time(),
    )  # fmt: skip
    return SignedSessionRequest(request, who.public_key,
                                sign_body(who, REQUEST_CONTEXT, request.body_bytes()))  # fmt: skip


def send_raw(url: str, signed: Any) -> None:
    async def send() -> None:
        async with RegistryClient(url, timeout=10) as client:
            await client.request_session(signed)

    RUNTIME.run(send(), timeout=30)


def test_hostile_text_in_a_request_shows_inert(published: tuple[str, Host, SignedListing]) -> None:
    url, host, listing = published
    send_raw(url, hostile_request(Identity.generate(), listing, EVIL))
    ask_session(url, Identity.generate(), listing, [hour(2)], "two\nlines\tand a tab")
    newest, evil = host.inbox
    assert newest.message == "two\nlines\tand a tab" or newest.message == "two\nlines and a tab"
    assert "\x1b" not in evil.message and "evil" not in evil.message  # refused, not shown
    assert "cannot open or show" in evil.message and evil.status == "pending"
    view = host.inbox
    for shown in (str(view), view._repr_html_(), json.dumps([e.row() for e in view])):
        assert "\x1b" not in shown and "\u202e" not in shown and "\x07" not in shown
    assert "two\\nlines" in str(view)  # a newline in a cell shows escaped


def test_only_requests_to_this_host_show(tmp_path: Path) -> None:
    with running_registry(tmp_path) as registry:
        with quiet_host(tmp_path / "a") as mine, quiet_host(tmp_path / "b") as other:
            assert mine.id != other.id
            for host in (mine, other):
                host.send(torch.ones(3), tags=["ages"])
            listing = mine.publish("ages", registry_url=registry.url, name="Mine", license="MIT")
            theirs = other.publish("ages", registry_url=registry.url, name="Theirs",
                                   license="MIT")  # fmt: skip
            ask_session(registry.url, Identity.generate(), theirs.signed, [hour(2)], "to them")
            assert len(mine.inbox) == 0 and len(other.inbox) == 1
            ask_session(registry.url, Identity.generate(), listing.signed, [hour(2)], "to me")
            assert [e.message for e in mine.inbox] == ["to me"]
            with pytest.raises(DuetError, match="no session request"):
                mine.registry.call(mine.registry.find_async(other.inbox[0].request_id))


# -- duet-host through the control socket -----------------------------------------------------


class Admin(HostAdmin, RegistryAdmin):
    """HostAdmin with the registry commands (as duet-host serve offers them)."""


@contextlib.contextmanager
def control(host: Host, folder: Path) -> Iterator[Path]:
    folder.mkdir(mode=0o700)
    server = ControlServer(folder / "c.sock", Admin(host))
    RUNTIME.run(server.start(), timeout=10)
    try:
        yield server.path
    finally:
        RUNTIME.run(server.close(), timeout=10)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_duet_host_publish_listings_inbox_and_unpublish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with (
        running_registry(tmp_path) as registry,
        quiet_host(tmp_path) as host,
        control(host, tmp_path / "ctl") as sock,
    ):
        host.send(torch.ones(3), tags=["ages"])
        description = tmp_path / "ages.md"
        description.write_text("# Ages\r\n\r\nMade up.\r\n")
        s = ["--socket", str(sock)]
        code, out, err = cli(capsys, "publish", "ages", "--name", "Made-up ages", "--license",
                             "CC-BY-4.0", "--summary", "ages", "--description-file",
                             str(description), "--tag", "health", "--tag", "synthetic",
                             "--registry", registry.url, *s)  # fmt: skip
        assert code == 0, err
        (row,) = host.listings
        assert f"as listing {row.listing_id} (version 1) on {registry.url}" in out
        spec = row.signed.spec
        assert spec.description == "# Ages\n\nMade up.\n" and spec.keywords == ["health",
                                                                                 "synthetic"]  # fmt: skip
        code, out, _ = cli(capsys, "listings", *s)
        assert code == 0 and row.listing_id in out and "Made-up ages" in out
        code, out, _ = cli(capsys, "listings", "--json", *s)
        assert json.loads(out)[0]["listing_id"] == row.listing_id

        alice, bob = Identity.generate(), Identity.generate()
        times = [hour(3), hour(4)]
        send_raw(registry.url, hostile_request(alice, row.signed, EVIL, tuple(times)))
        ask_session(registry.url, bob, row.signed, times[:1], "bob here")
        code, out, _ = cli(capsys, "inbox", *s)
        assert code == 0 and "bob here" in out and format_local(times[1]) in out
        assert "\x1b" not in out and "\u202e" not in out and "Made-up ages" in out
        rows = json.loads(cli(capsys, "inbox", "--json", *s)[1])["results"]
        ids = {r["scientist_id"]: r["request_id"] for r in rows}
        local = time.strftime("%Y-%m-%dT%H:%M", time.localtime(times[1]))
        code, out, _ = cli(capsys, "inbox", "accept", ids[alice.id], "--at", local, *s)
        assert code == 0 and f"accepted at {format_local(times[1])}" in out
        code, out, _ = cli(capsys, "inbox", "propose", ids[bob.id], "--at", "2999-01-01T00:00",
                           *s)  # fmt: skip
        assert code == 1  # more than 400 days ahead: the document refuses it
        iso = time.strftime("%Y-%m-%dT%H:%M%z", time.localtime(hour(50)))
        code, out, _ = cli(capsys, "inbox", "propose", ids[bob.id], "--at", iso, "--message",
                           "later?", *s)  # fmt: skip
        assert code == 0 and "proposed" in out
        code, _, err = cli(capsys, "inbox", "decline", ids[alice.id], "--reason", "sorry", *s)
        assert code == 0
        statuses = {(s.scientist_id, s.status) for s in sessions_of(registry.url, alice)}
        assert statuses == {(alice.id, "declined")}

        code, _, err = cli(capsys, "inbox", "accept", *s)
        assert code == 1 and "needs the request's ID" in err
        code, _, err = cli(capsys, "inbox", "accept", "f" * 32, *s)
        assert code == 1 and "no session request" in err
        with pytest.raises(SystemExit):
            main(["inbox", "accept", ids[bob.id], "--at", "next tuesday", *s])
        code, _, err = cli(capsys, "inbox", "propose", ids[bob.id], *s)
        assert code == 1 and "--at" in err

        code, out, _ = cli(capsys, "unpublish", "ages", *s)
        assert code == 0 and row.listing_id in out and len(host.listings) == 0
        code, _, err = cli(capsys, "unpublish", "ages", *s)
        assert code == 1 and "nothing" in err


@pytest.mark.parametrize("argv", [["publish"], ["unpublish"], ["listings"], ["inbox"]], ids=repr)
def test_registry_commands_teach_with_examples(argv: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"duet-host {argv[0]}" in out


def test_control_arguments_are_checked_before_the_host_sees_them() -> None:
    from duet_p2p.host.control import _Invalid, parse_request

    def parse(command: str, **args: Any) -> list[object]:
        return parse_request(json.dumps({"command": command, "args": args}).encode())[2]

    base = {"tag": "ages", "name": "Ages", "license": "MIT"}
    assert parse("publish", **base)[:6] == ["ages", "Ages", "", "", "MIT", []]
    for bad in [{"name": ""}, {"name": "x" * 201}, {"tag": "a\x1bb"}, {"keywords": "a"},
                {"keywords": ["ok", 5]}, {"registry": "ftp://127.0.0.1"},
                {"modality": "smell"}, {"description": "x" * 50_001}, {"colour": 1}]:  # fmt: skip
        with pytest.raises(_Invalid):
            parse("publish", **{**base, **bad})
    assert parse("inbox_accept", request_id="A" * 32) == ["a" * 32, None]
    for bad in [{"at": "soon"}, {"at": float("nan")}, {"at": True}]:
        with pytest.raises(_Invalid):
            parse_request(json.dumps({"command": "inbox_accept",
                                      "args": {"request_id": "a" * 32, **bad}}).encode())  # fmt: skip
    for times in [[], [1.0] * 6, ["x"], 5]:
        with pytest.raises(_Invalid):
            parse("inbox_propose", request_id="a" * 32, times=times)
    with pytest.raises(_Invalid):
        parse("inbox_propose", request_id="a" * 32, times=[hour(2)], message="x" * 2001)
