"""`make demo-dp`: differentially private statistics of a table the scientist never sees.

Starts a signaling server, the owner (who hosts scikit-learn's diabetes table, private,
with a privacy budget and a rule that answers DP questions within it) and the scientist
(who asks a count, means, a histogram and a median, then one question too many), passes
the IDs between them, and prints what the scientist saw.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _orchestrate import Demo  # noqa: E402


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, Demo() as demo:
        owner = [str(HERE / "owner.py"), "--audit", str(Path(tmp) / "audit.jsonl"),
                 "--ledger", str(Path(tmp) / "ledger.sqlite")]  # fmt: skip
        scientist = demo.run("demo-dp", owner, [str(HERE / "scientist.py")],
                             scientist_timeout=110, owner_timeout=20)  # fmt: skip
        if scientist is None:
            return 1
        if not any("refused:" in line for line in scientist.lines):
            print("demo-dp failed: the budget was not enforced")
            return 1
        print(f"\ndone in {time.monotonic() - started:.0f} s; no row of the table left the "
              "owner's side, and every answer was paid for from the budget.")  # fmt: skip
        return 0


if __name__ == "__main__":
    sys.exit(main())
