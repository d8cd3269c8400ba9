"""`make demo-offline`: a job submitted while the host is down, collected the next morning.

1. A signaling server starts with its mailbox on disk (``--state sqlite:///...``).
2. The scientist records a digits training + evaluation job, signs it and leaves it,
   encrypted to the host's key, in the host's mailbox. The host is not running.
3. The host starts (``duet-host serve``), reads its mailbox, approves the code by policy
   (the scientist's Client ID is listed in ``[jobs]``) and runs it in a sandboxed worker.
4. The owner looks at the outputs (``duet-host job``) and releases them
   (``duet-host release``); the host mails the results, signed, to the scientist.
5. The scientist collects them: test accuracy (>= 0.90) and the trained model, checked
   against the host's receipt.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _orchestrate import Demo, DemoFailed  # noqa: E402

JOB_ID = re.compile(r"Job ID: ([0-9a-f]{32})")
ACCURACY = re.compile(r"test accuracy: ([0-9.]+)")
TEST_SIZE = 360


def write_digits(folder: Path) -> None:
    """The owner's data: scikit-learn's digits (shipped with it), split once, as npy."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    for name, value in (("train_images", x[train]), ("train_labels", y[train]),
                        ("test_images", x[test]), ("test_labels", y[test])):  # fmt: skip
        np.save(folder / f"{name}.npy", value)


def host_toml(folder: Path, url: str, client_id: str) -> Path:
    text = (HERE / "host.toml").read_text()
    text = text.replace('signaling_url = "http://127.0.0.1:8765"', f'signaling_url = "{url}"')
    text = text.replace("DATA_DIR", str(folder)).replace("SCIENTIST_CLIENT_ID", client_id)
    path = folder / "host.toml"
    path.write_text(text)
    return path


def wait_for_state(demo: Demo, home: Path, config: Path, job_id: str, state: str,
                   timeout: float) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        argv = [sys.executable, "-m", "duet_p2p.host.cli", "jobs", "--all", "--json",
                "--config", str(config)]  # fmt: skip
        done = subprocess.run(argv, env={**demo.env, "DUET_HOME": str(home)},
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        if done.returncode == 0:
            rows = json.loads(done.stdout or "[]")
            found = [r for r in rows if r.get("job_id") == job_id]
            if found and found[0].get("state") == state:
                return
            if found and found[0].get("state") in ("failed", "rejected", "timed_out", "expired"):
                raise DemoFailed(f"the job ended {found[0]['state']}: {found[0].get('reason')}")
        time.sleep(1.0)
    raise DemoFailed(f"the job did not reach {state} within {timeout:g} s")


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, Demo() as demo:
        root = Path(tmp)
        owner_home, scientist_home, data = (root / n for n in ("owner", "scientist", "data"))
        for folder in (owner_home, scientist_home, data):
            folder.mkdir(mode=0o700)
        try:
            mailbox = root / "mailbox.sqlite"
            url = demo.start_signaling(extra=["--state", f"sqlite:///{mailbox}"])
            write_digits(data)
            scientist = [str(HERE / "scientist.py")]
            client_id = demo.command("scientist", scientist_home,
                            ["-c", "import duet_p2p as sy; print(sy.Identity.load('default').id)"]
                            ).strip()  # fmt: skip
            config = host_toml(data, url, client_id)
            host = json.loads(demo.duet_host(owner_home, config, "id", "--json"))
            print("\n-- 9 pm in Tokyo: the host is offline; the scientist submits a job --")
            out = demo.command("scientist", scientist_home,
                      [*scientist, "submit", host["host_id"], host["public_key"], url])  # fmt: skip
            job_id = JOB_ID.search(out)[1]  # type: ignore[index]
            print("\n-- morning in Boston: the owner starts the host --")
            demo.env["DUET_HOME"] = str(owner_home)
            server = demo.start("host", ["-m", "duet_p2p.host.cli", "serve", "--config",
                                         str(config)])  # fmt: skip
            wait_for_state(demo, owner_home, config, job_id, "pending_output_review", 240)
            demo.duet_host(owner_home, config, "job", job_id)
            demo.duet_host(owner_home, config, "release", job_id)
            wait_for_state(demo, owner_home, config, job_id, "delivered", 60)
            print("\n-- the next morning in Tokyo: the scientist collects the results --")
            out = demo.command("scientist", scientist_home,
                      [*scientist, "collect", host["host_id"], job_id, url], timeout=120)  # fmt: skip
            accuracy = float(ACCURACY.search(out)[1])  # type: ignore[index]
            if accuracy < 0.90:
                raise DemoFailed(f"test accuracy {accuracy:.3f} is below 0.90")
            server.popen.terminate()
            if server.wait(30):
                raise DemoFailed("the host did not stop cleanly")
        except DemoFailed as exc:
            print(f"demo-offline failed: {exc}")
            return 1
        print(f"\ndone in {time.monotonic() - started:.0f} s: the data never left the host; "
              "the scientist got the accuracy and the weights the owner released.")  # fmt: skip
        return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
