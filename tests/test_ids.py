"""Duet and Client IDs: commitments to every fingerprint line of a description."""

from __future__ import annotations

import os

import pytest

from duet_p2p import ids
from duet_p2p.errors import PeerVerificationError
from duet_p2p.transport.peer import new_peer_connection, restrict_host_addresses


def fingerprint(n_bytes: int = 32) -> str:
    return ":".join(f"{b:02X}" for b in os.urandom(n_bytes))


def sdp_with(*lines: str) -> str:
    """A description shaped like aiortc's, with the given fingerprint lines."""
    head = ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", "m=application 9 DTLS/SCTP 5000"]
    tail = ["a=setup:actpass", "a=ice-ufrag:abcd", "a=ice-pwd:0123456789abcdef0123456789"]
    return "\r\n".join([*head, *lines, *tail]) + "\r\n"


SHA256_A = f"a=fingerprint:sha-256 {fingerprint()}"
SHA256_B = f"a=fingerprint:sha-256 {fingerprint()}"
SHA384 = f"a=fingerprint:sha-384 {fingerprint(48)}"
SHA512 = f"a=fingerprint:sha-512 {fingerprint(64)}"


def test_id_is_32_lowercase_hex_digits() -> None:
    value = ids.fingerprint_id(sdp_with(SHA256_A))
    assert len(value) == ids.ID_HEX_LENGTH == 32
    assert value == ids.normalise_id(value)


def test_id_commits_to_every_fingerprint_line() -> None:
    base = [SHA256_A, SHA384, SHA512]
    reference = ids.fingerprint_id(sdp_with(*base))
    variants = {
        "added sha-256": [*base, SHA256_B],
        "added sha-1": [*base, f"a=fingerprint:sha-1 {fingerprint(20)}"],
        "removed sha-384": [SHA256_A, SHA512],
        "removed sha-512": [SHA256_A, SHA384],
        "sha-256 replaced": [SHA256_B, SHA384, SHA512],
        "sha-512 replaced": [SHA256_A, SHA384, f"a=fingerprint:sha-512 {fingerprint(64)}"],
        "algorithm renamed": [SHA256_A, SHA384, SHA512.replace("sha-512", "sha-384")],
    }
    for what, lines in variants.items():
        assert ids.fingerprint_id(sdp_with(*lines)) != reference, what
    # one changed hex digit anywhere in any line changes the ID
    for line_index, line in enumerate(base):
        for position in (len("a=fingerprint:sha-xxx "), len(line) - 1):
            digit = line[position]
            changed = line[:position] + ("0" if digit != "0" else "1") + line[position + 1 :]
            lines = list(base)
            lines[line_index] = changed
            assert ids.fingerprint_id(sdp_with(*lines)) != reference, (line_index, position)


def test_id_ignores_what_does_not_change_the_certificates() -> None:
    reference = ids.fingerprint_id(sdp_with(SHA256_A, SHA384))
    assert ids.fingerprint_id(sdp_with(SHA384, SHA256_A)) == reference  # order
    lower = SHA256_A.replace(SHA256_A.split()[1], SHA256_A.split()[1].lower())
    assert ids.fingerprint_id(sdp_with(lower, SHA384)) == reference  # hex case
    assert ids.fingerprint_id(sdp_with(SHA256_A.replace("sha-256", "SHA-256"), SHA384)) == reference
    assert ids.fingerprint_id(sdp_with(SHA256_A, SHA384).replace("\r\n", "\n")) == reference
    assert ids.fingerprint_id(sdp_with(SHA256_A, SHA384, SHA256_A)) == reference  # repeated line


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "no sha-256 fingerprint"),
        ([SHA384], "no sha-256 fingerprint"),
        ([SHA256_A, "a=fingerprint:sha-256"], "malformed fingerprint line"),
        ([SHA256_A, "a=fingerprint:sha-256 ZZ:11"], "malformed fingerprint line"),
        ([SHA256_A, "a=fingerprint:sha-256 AB:CD extra"], "malformed fingerprint line"),
        ([SHA256_A, f"a=fingerprint:md5 {fingerprint(16)}"], "unsupported fingerprint algorithm"),
    ],
)
def test_descriptions_without_a_usable_fingerprint_are_refused(
    lines: list[str], message: str
) -> None:
    with pytest.raises(PeerVerificationError, match=message):
        ids.fingerprint_id(sdp_with(*lines))


def test_pasted_ids_are_normalised() -> None:
    value = ids.fingerprint_id(sdp_with(SHA256_A))
    for pasted in (
        value,
        value.upper(),
        f"  {value}\n",
        f"'{value}'",
        f'"{value}"',
        f"\t'{value.upper()}' ",
        f"'{value}\n'",
        f'"  {value} "',
    ):
        assert ids.normalise_id(pasted) == value, repr(pasted)


@pytest.mark.parametrize(
    "junk",
    ["", " ", "abc", "0" * 31, "0" * 33, "g" * 32, "0" * 16 + " " + "0" * 16, "0x" + "0" * 30,
     "'" + "0" * 31 + "'", "0" * 32 + "\n" + "0" * 32, "0" * 32 + "\n0"],
)  # fmt: skip
def test_junk_ids_are_refused(junk: str) -> None:
    with pytest.raises(PeerVerificationError, match="Duet ID"):
        ids.normalise_id(junk, what="Duet ID")


@pytest.mark.parametrize("junk", [None, 123, b"0" * 32, ["0" * 32]])
def test_ids_of_other_types_are_refused(junk: object) -> None:
    with pytest.raises(PeerVerificationError):
        ids.normalise_id(junk)  # type: ignore[arg-type]


def test_refusal_shows_only_a_bounded_part_of_the_input() -> None:
    with pytest.raises(PeerVerificationError) as info:
        ids.normalise_id("z" * 10_000)
    assert len(str(info.value)) < 200


def test_verify_sdp() -> None:
    sdp = sdp_with(SHA256_A, SHA384)
    ids.verify_sdp(sdp, ids.fingerprint_id(sdp), role="owner")
    other = ids.fingerprint_id(sdp_with(SHA256_B))
    with pytest.raises(PeerVerificationError, match="owner's description does not match") as info:
        ids.verify_sdp(sdp, other, role="owner")
    assert other in str(info.value) and ids.fingerprint_id(sdp) in str(info.value)
    # a server that appends its own fingerprint line is caught as well
    with pytest.raises(PeerVerificationError, match="scientist's"):
        ids.verify_sdp(sdp + SHA256_B + "\r\n", ids.fingerprint_id(sdp), role="scientist")
    with pytest.raises(PeerVerificationError):
        ids.verify_sdp(sdp_with(), ids.fingerprint_id(sdp), role="owner")


async def test_real_descriptions_have_distinct_ids() -> None:
    restrict_host_addresses(["127.0.0.1"])
    pcs = [new_peer_connection([])[0] for _ in range(2)]
    try:
        found = []
        for pc in pcs:
            await pc.setLocalDescription(await pc.createOffer())
            sdp = pc.localDescription.sdp
            assert ids.sdp_fingerprints(sdp)
            found.append(ids.fingerprint_id(sdp))
            ids.verify_sdp(sdp, found[-1], role="owner")
        assert found[0] != found[1]
    finally:
        for pc in pcs:
            await pc.close()
