"""End to end: an owner's standing host publishes, a scientist searches, connects with
``listing.connect()`` and gets an approved value.

Everything is real and on loopback: the registry (``start_registry``, SQLite), the
signaling server (the session fixture), the standing host (``sy.launch_host``, its own
worker processes) and the scientist's Duet over WebRTC. The scientist also asks for a
session through the registry; the host's inbox loop picks it up and the owner accepts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

import duet_p2p as sy
from duet_p2p.host.config import RegistryOptions
from duet_p2p.host.jobs import JobSettings
from duet_p2p.identity import Identity
from tests.conftest import wait_for
from tests.host.test_host_publish import running_registry, serving_host

WAIT = 20.0
DATA = torch.arange(12, dtype=torch.float32).reshape(4, 3)


def test_publish_search_connect_and_get_an_approved_value(
    signaling_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="duet_p2p.host.registry_link")
    fast = RegistryOptions(heartbeat_seconds=0.5, inbox_seconds=0.3)
    with (
        running_registry(tmp_path) as registry,
        serving_host(signaling_url, tmp_path, fast, jobs=JobSettings(mailbox=False)) as host,
    ):
        # the owner hosts a tensor and lists it
        host.send(DATA, tags=["ward_ages"])
        published = host.publish(
            "ward_ages", registry_url=registry.url, name="Ages by ward",
            summary="Made-up patient ages, four wards", license="CC-BY-4.0",
            tags=["health", "synthetic"], description="Three columns per ward.",
        )  # fmt: skip
        assert published.version == 1 and published.host_id == host.id

        # a scientist finds it (verified, and online once a heartbeat has come)
        def found() -> sy.registry.Listing | None:
            results = sy.registry.search("ward ages", registry_url=registry.url)
            hits = [item for item in results if item.id == published.id]
            return hits[0] if hits and hits[0].online else None

        assert wait_for(lambda: found() is not None, WAIT)
        listing = found()
        assert listing is not None
        assert (listing.host_id, listing.spec.signaling_url) == (host.id, signaling_url)
        assert listing.schema == [{"name": "ward_ages", "dtype": "float32", "shape": [4, 3]}]
        assert "offline_jobs" in listing.access_modes
        assert "the owner reviews every request" in listing.spec.policy_summary

        # ... connects over WebRTC, computes, and asks for the value
        scientist = Identity.generate()
        duet = listing.connect(identity=scientist, timeout=WAIT)
        try:
            total = duet.store["ward_ages"].sum()
            handle = total.get(reason="total age", request_block=False)
            assert wait_for(lambda: len(host.requests) == 1 and host.requests[0].ready, WAIT)
            request = host.requests[0]
            assert request.requester == duet.client_id == scientist.id
            request.accept()  # the owner approves
            assert float(handle.result(timeout=WAIT)) == float(DATA.sum())
        finally:
            duet.close()

        # ... and asks for a session: the inbox loop sees it, the owner accepts
        start = float((int(time.time()) // 60 + 24 * 60) * 60)
        session = listing.request_session([start], minutes=30, message="A follow-up?",
                                          identity=scientist)  # fmt: skip
        assert session.status == "pending"
        assert wait_for(lambda: session.request_id in caplog.text, WAIT)
        entry = host.inbox[session.request_id]
        assert (entry.message, entry.listing_name) == ("A follow-up?", "Ages by ward")
        entry.accept()
        mine = sy.registry.sessions(identity=scientist, registry_url=registry.url)
        assert [(s.status, s.state.start) for s in mine] == [("accepted", start)]
