"""A data owner that types the scientist's Client ID at the prompt, as a person would.

    python connect_stdin_owner.py SIGNALING_URL AUDIT_PATH

Calls ``sy.launch_duet(url)`` without a Client ID, so it is read from stdin by input().
Once connected it hosts the seed tensor, prints ``SENT``, accepts the first request,
waits for the scientist to close and exits 0 (3 if nothing arrived in time).
"""

from __future__ import annotations

import sys

import torch

import duet_p2p as sy


def main(url: str, audit_path: str) -> int:
    duet = sy.launch_duet(url, audit_path=audit_path, timeout=20)
    data = torch.tensor([[0, 0], [0, 1]]).tag("data")
    data.send(duet, searchable=True)
    print("SENT", flush=True)
    request = duet.requests.wait(timeout=20)
    if request is None:
        return 3
    duet.requests[0].accept()
    print("ACCEPTED", flush=True)
    closed = duet.wait_closed(timeout=20)
    duet.close()
    return 0 if closed else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
