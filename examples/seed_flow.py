"""`make demo`: the seed flow end to end on this machine, as three processes.

Starts a signaling server, the owner and the scientist; passes the Duet ID to the
scientist and types the scientist's Client ID at the owner's prompt, as two people would
over chat. Every line each process prints is shown, prefixed with its role.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _orchestrate import Demo  # noqa: E402


def main() -> int:
    with Demo() as demo:
        scientist = demo.run(
            "demo",
            [str(HERE / "seed_owner.py")],
            [str(HERE / "seed_scientist.py")],
            scientist_timeout=90,
            owner_timeout=90,
        )
        if scientist is None:
            return 1
        result = scientist.lines[-1].strip() if scientist.lines else ""
        print(f"\nThe scientist got {result}; the data never left the owner's side.")
        return 0


if __name__ == "__main__":
    sys.exit(main())
