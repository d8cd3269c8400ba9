"""Persistent identities: key files, IDs, and signatures that bind a connection."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from duet_p2p.errors import ConfigurationError, PeerVerificationError
from duet_p2p.identity import Identity, SessionBinding, fresh_nonce, id_of, verify

SDP = (
    "v=0\r\na=fingerprint:sha-256 "
    "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89"
    "\r\n"
)
OTHER_SDP = SDP.replace("AB:CD", "00:11", 1)


def test_created_on_first_use_private_and_stable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DUET_HOME", str(tmp_path / "home"))
    first = Identity.load()
    again = Identity.load()
    assert first.id == again.id == id_of(first.public_key) and len(first.id) == 32
    assert first.path == tmp_path / "home" / "identities" / "default.key"
    assert stat.S_IMODE(os.stat(first.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(first.path.parent).st_mode) == 0o700
    assert Identity.load("lab").id != first.id


def test_a_key_others_can_read_is_refused(tmp_path: Path):
    identity = Identity.load("x", tmp_path)
    assert identity.path is not None
    os.chmod(identity.path, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        Identity.load("x", tmp_path)


def test_a_file_that_is_not_a_key_is_refused(tmp_path: Path):
    (tmp_path / "bad.key").write_bytes(b"not a key")
    os.chmod(tmp_path / "bad.key", 0o600)
    with pytest.raises(ConfigurationError, match="not an identity key"):
        Identity.load("bad", tmp_path)
    with pytest.raises(ConfigurationError, match="identity name"):
        Identity.load("../escape", tmp_path)


def test_a_signed_binding_verifies_against_the_id():
    host, scientist = Identity.generate(), Identity.generate()
    nonce = fresh_nonce()
    binding = SessionBinding.for_sdp("host", scientist.id, nonce, SDP)
    signature = host.sign(binding)
    verify(host.id, host.public_key, signature, binding)
    verify(host.id.upper(), host.public_key, signature, binding)  # as a person typed it


def test_every_substitution_is_caught():
    host, scientist, server = Identity.generate(), Identity.generate(), Identity.generate()
    nonce = fresh_nonce()
    binding = SessionBinding.for_sdp("host", scientist.id, nonce, SDP)
    signature = host.sign(binding)
    cases = {
        "another key for the host's ID": (host.id, server.public_key, server.sign(binding)),
        "the fingerprints": (
            host.id, host.public_key, signature,
            SessionBinding.for_sdp("host", scientist.id, nonce, OTHER_SDP),
        ),
        "a replayed nonce": (
            host.id, host.public_key, signature,
            SessionBinding.for_sdp("host", scientist.id, fresh_nonce(), SDP),
        ),
        "the addressee": (
            host.id, host.public_key, signature,
            SessionBinding.for_sdp("host", server.id, nonce, SDP),
        ),
        "the role": (
            host.id, host.public_key, signature,
            SessionBinding.for_sdp("scientist", scientist.id, nonce, SDP),
        ),
        "a truncated signature": (host.id, host.public_key, signature[:-1]),
    }  # fmt: skip
    for what, case in cases.items():
        claimed, key, sig, *rest = case
        with pytest.raises(PeerVerificationError):
            verify(claimed, key, sig, rest[0] if rest else binding)
            pytest.fail(f"not caught: {what}")
    with pytest.raises(PeerVerificationError):
        verify("not an id", host.public_key, signature, binding)
