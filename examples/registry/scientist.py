"""A scientist who finds data on the OpenGrid registry instead of being sent an ID.

``find``: search the registry, look at the listing and its mock, connect with
``listing.connect()``, ask a DP mean (the host's rule approves it) and ask the owner for a
live session tomorrow. ``sessions``: see the owner's answer, in this machine's time zone.

Usage: ``python scientist.py find|sessions REGISTRY_URL``
"""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta

import duet_p2p as sy


def find(registry_url: str) -> None:
    found = sy.registry.search("patients smoking", registry_url=registry_url, online=True)
    print(found)
    listing = found[0]
    print(listing)
    print("the owner's sample (made-up records, published with the listing):")
    print(listing.sample())
    print("a mock to dry-run code on (synthetic, from the schema alone):")
    print(listing.mock(rows=3))
    duet = listing.connect(identity="demo-scientist")
    try:
        ages = duet.store[listing.tag]  # the name the host knows it by
        mean_age = duet.dp.mean(ages, "age", bounds=(0, 100), epsilon=0.5, timeout_secs=60)
        print(f"DP mean age, approved by the host's rule: about {mean_age:.1f}")
    finally:
        duet.close()
    tomorrow = (datetime.now().astimezone() + timedelta(days=1)).replace(
        hour=14, minute=0, second=0, microsecond=0
    )
    session = listing.request_session(
        [tomorrow, tomorrow + timedelta(hours=2)], minutes=45,
        message="Could we go through the smoking column together?", identity="demo-scientist",
    )  # fmt: skip
    print(f"session request {session.request_id}: {session.status}")


def sessions(registry_url: str) -> None:
    mine = sy.registry.sessions(identity="demo-scientist", registry_url=registry_url)
    print(mine)
    accepted = [s for s in mine if s.status == "accepted"]
    if not accepted:
        raise SystemExit("no session was accepted")
    print(f"agreed: {accepted[0].start_local:%A %d %B %Y, %H:%M %Z} (my time zone)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["find", "sessions"])
    parser.add_argument("registry_url")
    options = parser.parse_args()
    find(options.registry_url) if options.step == "find" else sessions(options.registry_url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
