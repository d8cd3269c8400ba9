"""`make demo-host`: a standing host serves a scientist who leaves and comes back.

Starts a signaling server and `duet-host serve` with this directory's host.toml (a table
of made-up patients, handlers, a privacy budget). A scientist asks to connect; the owner
admits them with `duet-host admit`; they ask a DP mean (answered by a rule) and an exact
mean (left for the owner) and leave. The owner accepts it with `duet-host accept`; the
scientist connects again and fetches the value. Then SIGTERM stops the host cleanly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _orchestrate import Demo, DemoFailed  # noqa: E402

HOST_ID = re.compile(r"Host ID: ([0-9a-f]{32})")
CLIENT_ID = re.compile(r"as Client ID ([0-9a-f]{32})")
REQUEST_ID = re.compile(r"request ([0-9a-f]{32}) is pending")


def host_toml(tmp: Path, url: str) -> Path:
    text = (HERE / "host.toml").read_text()
    text = text.replace('signaling_url = "http://127.0.0.1:8765"', f'signaling_url = "{url}"')
    text = text.replace('path = "ages.csv"', f'path = "{HERE / "ages.csv"}"')
    text = text.replace('# data_dir = "/var/lib/duet"', f'data_dir = "{tmp}"')
    path = tmp / "host.toml"
    path.write_text(text)
    return path


def duet_host(demo: Demo, config: Path, *args: str) -> str:
    """Run one `duet-host` command, as the owner would in another terminal."""
    argv = [sys.executable, "-m", "duet_p2p.host.cli", *args, "--config", str(config)]
    print(f"[owner    ] $ duet-host {' '.join(args)}")
    done = subprocess.run(argv, env=demo.env, capture_output=True, text=True, timeout=30)
    for line in (done.stdout + done.stderr).splitlines():
        print(f"[owner    ] {line}")
    if done.returncode:
        raise DemoFailed(f"duet-host {args[0]} failed")
    return done.stdout


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, Demo() as demo:
        demo.env["DUET_HOME"] = str(Path(tmp) / "home")
        try:
            url = demo.start_signaling()
            config = host_toml(Path(tmp), url)
            host = demo.start("host", ["-m", "duet_p2p.host.cli", "serve", "--config",
                                       str(config)])  # fmt: skip
            host_id = host.wait_for(HOST_ID, "the Host ID", 60)[1]
            scientist = demo.start("scientist", [str(HERE / "scientist.py"), "ask", host_id, url])
            client_id = scientist.wait_for(CLIENT_ID, "the Client ID", 60)[1]
            time.sleep(1)  # the owner looks before admitting
            duet_host(demo, config, "admissions")
            duet_host(demo, config, "admit", client_id)
            request_id = scientist.wait_for(REQUEST_ID, "the pending request", 90)[1]
            if scientist.wait(60):
                raise DemoFailed("the scientist's first visit failed")
            duet_host(demo, config, "requests")
            duet_host(demo, config, "accept", request_id)
            again = demo.start("scientist", [str(HERE / "scientist.py"), "fetch", host_id, url])
            if again.wait(90):
                raise DemoFailed("the scientist's second visit failed")
            duet_host(demo, config, "status")
            host.popen.terminate()  # SIGTERM: finish, persist, close
            if host.wait(30):
                raise DemoFailed("the host did not stop cleanly")
        except DemoFailed as exc:
            print(f"demo-host failed: {exc}")
            return 1
        print(f"\ndone in {time.monotonic() - started:.0f} s; the host kept the approved value "
              "for the scientist until they came back for it.")  # fmt: skip
        return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
