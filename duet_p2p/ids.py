"""Duet and Client IDs: short commitments to a peer's DTLS certificate fingerprints.

An ID is the first 128 bits (hex) of SHA-256 over every ``a=fingerprint`` line of a peer's
SDP, normalised and sorted. People exchange the IDs out of band (chat, email); each side then
checks the SDP the signaling server relayed against the ID it was given, so a server that
swaps an offer or an answer, or adds a fingerprint line of its own, is caught. DTLS then
proves that the peer holds the certificate behind those fingerprints.
"""

from __future__ import annotations

import hashlib
import re

from duet_p2p.errors import PeerVerificationError

ID_HEX_LENGTH = 32
_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
_FINGERPRINT_LINE = re.compile(r"^a=fingerprint:(\S+) ([0-9A-Fa-f:]+)\s*$")
_ALGORITHMS = {"sha-1", "sha-224", "sha-256", "sha-384", "sha-512"}


def sdp_fingerprints(sdp: str) -> list[tuple[str, str]]:
    """Every ``a=fingerprint`` line of ``sdp`` as sorted (algorithm, HEX:VALUE) pairs.

    Raises PeerVerificationError when there is none, when a line is malformed, or when no
    SHA-256 fingerprint is present (the one DTLS in aiortc always checks).
    """
    found: set[tuple[str, str]] = set()
    for raw in sdp.splitlines():
        line = raw.strip()
        if not line.startswith("a=fingerprint:"):
            continue
        match = _FINGERPRINT_LINE.match(line)
        if match is None:
            raise PeerVerificationError("the peer's description has a malformed fingerprint line")
        algorithm, value = match.group(1).lower(), match.group(2).upper()
        if algorithm not in _ALGORITHMS:
            raise PeerVerificationError(f"unsupported fingerprint algorithm {algorithm!r}")
        found.add((algorithm, value))
    if not any(algorithm == "sha-256" for algorithm, _ in found):
        raise PeerVerificationError("the peer's description carries no sha-256 fingerprint")
    return sorted(found)


def fingerprint_id(sdp: str) -> str:
    """The 32-hex-digit ID that commits to all fingerprints in ``sdp``."""
    canonical = "\n".join(f"{alg} {value}" for alg, value in sdp_fingerprints(sdp))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:ID_HEX_LENGTH]


def normalise_id(value: str, *, what: str = "ID") -> str:
    """Strip and lower-case an ID typed by a person; refuse anything but 32 hex digits."""
    if not isinstance(value, str):
        raise PeerVerificationError(f"the {what} must be a string of 32 hex digits")
    cleaned = value.strip().strip("'\"").strip().lower()
    if not _ID_PATTERN.fullmatch(cleaned):
        raise PeerVerificationError(
            f"{cleaned[:40]!r} is not a valid {what}: expected 32 hexadecimal digits"
        )
    return cleaned


def verify_sdp(sdp: str, expected_id: str, *, role: str) -> None:
    """Raise PeerVerificationError unless ``sdp`` is committed to by ``expected_id``."""
    actual = fingerprint_id(sdp)
    if actual != expected_id:
        raise PeerVerificationError(
            f"the {role}'s description does not match the ID you were given "
            f"(expected {expected_id}, the relayed one commits to {actual}); "
            "the signaling server or someone on the way substituted it, so the connection "
            "was refused"
        )
