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

from _orchestrate import Demo, DemoFailed  # noqa: E402


def main() -> int:
    with Demo() as demo:
        try:
            owner, scientist = demo.connect(
                [str(HERE / "seed_owner.py")], [str(HERE / "seed_scientist.py")]
            )
            scientist_rc = scientist.wait(timeout=90)
            owner_rc = owner.wait(timeout=90)
        except DemoFailed as exc:
            print(f"demo failed: {exc}")
            return 1
        if scientist_rc or owner_rc:
            print(f"demo failed: owner exit {owner_rc}, scientist exit {scientist_rc}")
            return 1
        result = scientist.lines[-1].strip() if scientist.lines else ""
        print(f"\nThe scientist got {result}; the data never left the owner's process.")
        return 0


if __name__ == "__main__":
    sys.exit(main())
