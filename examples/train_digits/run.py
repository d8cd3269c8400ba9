"""`make demo-train`: train a model on data the scientist never sees, as three processes.

Starts a signaling server, the owner (who hosts the digits data set, private) and the
scientist (who trains an MLP on it remotely), passes the IDs between them, and prints
the scientist's result: ``test accuracy: 0.9xx``.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _orchestrate import Demo  # noqa: E402

ACCURACY = re.compile(r"test accuracy: (\d\.\d+)")


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, Demo() as demo:
        audit = str(Path(tmp) / "owner_audit.jsonl")
        scientist = demo.run(
            "demo-train",
            [str(HERE / "owner.py"), "--audit", audit],
            [str(HERE / "scientist.py")],
            scientist_timeout=110,
            owner_timeout=20,
        )
        if scientist is None:
            return 1
        found = [m for line in scientist.lines if (m := ACCURACY.search(line))]
        if not found:
            print("demo-train failed: the scientist printed no accuracy")
            return 1
        print(f"\ntest accuracy: {found[-1][1]} (in {time.monotonic() - started:.0f} s); "
              "the digits never left the owner's side.")  # fmt: skip
        return 0


if __name__ == "__main__":
    sys.exit(main())
