"""A scientist of a standing host: asks, leaves, comes back for what was approved.

``ask``: connect (the host's owner admits this Client ID once), ask a DP mean (the host's
rule answers at once) and an exact mean (no rule covers it: it waits for the owner), leave.
``fetch``: connect again, list the requests, fetch the value approved meanwhile.

Usage: ``python scientist.py ask|fetch HOST_ID SIGNALING_URL``
"""

from __future__ import annotations

import argparse

import duet_p2p as sy


def ask(duet: sy.Duet) -> None:
    print(duet.store)
    ages = duet.store["ages"]
    mean_age = duet.dp.mean(ages, "age", bounds=(0, 100), epsilon=0.2, timeout_secs=60)
    print(f"DP mean age: about {mean_age:.1f}")
    exact = ages[:, 2].mean().get(reason="the exact mean weight", request_block=False)
    print(f"asked for the exact mean weight: request {exact.request_id} is {exact.status}")


def fetch(duet: sy.Duet) -> None:
    requests = duet.requests
    print(requests)
    kept = [r for r in requests if r.status == "accepted" and r.kept]
    if not kept:
        raise SystemExit("nothing approved is waiting")
    print(f"mean weight, approved while I was away: {float(kept[0].get()):.2f} kg")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["ask", "fetch"])
    parser.add_argument("host_id")
    parser.add_argument("signaling_url")
    options = parser.parse_args()
    duet = sy.join_duet(options.host_id, signaling_url=options.signaling_url,
                        identity="demo-scientist")  # fmt: skip
    try:
        ask(duet) if options.step == "ask" else fetch(duet)
    finally:
        duet.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
