"""`make demo-registry`: an owner lists a dataset on the OpenGrid registry; a scientist finds
it, connects and asks for a session.

1. A signaling server starts with the registry mounted beside it
   (``--registry-database``): one small deployment does both.
2. The owner's standing host starts (``duet-host serve``) and publishes its ``ages`` table
   (``duet-host publish``): a listing signed with the host's key, never the data, with a
   few made-up records as its sample (``--sample-file made_up.csv``).
3. The scientist searches the registry, looks at the listing, its sample and a mock shaped
   like its schema, connects with ``listing.connect()`` and gets a DP mean the host's rule approves;
   then asks the owner for a live session tomorrow.
4. The owner, in New York, reads the request in ``duet-host inbox`` and accepts it.
5. The scientist, in Tokyo, sees the agreed time in their own time zone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _orchestrate import Demo, DemoFailed  # noqa: E402

HOST_ID = re.compile(r"Host ID: ([0-9a-f]{32})")
REQUEST = re.compile(r"session request ([0-9a-f]{32}): pending")


def host_toml(folder: Path, signaling_url: str, registry_url: str) -> Path:
    """The standing host example's host.toml: any scientist may connect, and a registry."""
    text = (HERE.parent / "host" / "host.toml").read_text()
    text = text.replace(
        'signaling_url = "http://127.0.0.1:8765"', f'signaling_url = "{signaling_url}"'
    )
    text = text.replace('admit = "ask"', 'admit = "any"', 1)
    text = re.sub(r"(?ms)^\[registry\].*?(?=^\[|\Z)", "", text)
    text += f'\n[registry]\nurl = "{registry_url}"\nheartbeat_seconds = 2\ninbox_seconds = 2\n'
    shutil.copy(HERE.parent / "host" / "ages.csv", folder / "ages.csv")
    path = folder / "host.toml"
    path.write_text(text)
    return path


ZONES = {"owner": "America/New_York", "scientist": "Asia/Tokyo"}
"""Each side's own time zone: both see the agreed time in theirs."""


def run(demo: Demo, who: str, home: Path, argv: list[str]) -> str:
    """A command as ``who`` types it, in their own time zone."""
    return demo.command(who, home, argv, timeout=90, env={"TZ": ZONES[who]})


def duet_host(demo: Demo, home: Path, config: Path, *args: str) -> str:
    return demo.duet_host(home, config, *args, env={"TZ": ZONES["owner"]})


def wait_until(check: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise DemoFailed(f"timed out after {timeout:g} s waiting for {what}")


def online(registry_url: str, listing_id: str) -> bool:
    with urllib.request.urlopen(f"{registry_url}/api/v1/listings/{listing_id}", timeout=10) as r:
        return bool(json.load(r)["online"])


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, Demo() as demo:
        root = Path(tmp)
        owner_home, scientist_home, data = (root / n for n in ("owner", "scientist", "data"))
        for folder in (owner_home, scientist_home, data):
            folder.mkdir(mode=0o700)
        try:
            url = demo.start_signaling(
                extra=["--registry-database", f"sqlite:///{root / 'registry.sqlite'}"]
            )
            registry_url = f"{url}/registry"
            print(f"\n-- the registry's website: {registry_url}/ --")
            config = host_toml(data, url, registry_url)
            demo.env.update(DUET_HOME=str(owner_home), TZ=ZONES["owner"])
            demo.start("host", ["-m", "duet_p2p.host.cli", "serve", "--config", str(config)]
                       ).wait_for(HOST_ID, "the Host ID", 60)  # fmt: skip
            print("\n-- the owner lists the ages table: a signed description, not the data --")
            out = duet_host(
                demo, owner_home, config, "publish", "ages", "--name", "Made-up patients",
                "--summary", "Age, weight and smoking of made-up patients",
                "--description-file", str(HERE / "ages.md"), "--license", "CC-BY-4.0",
                "--tag", "health", "--tag", "smoking", "--tag", "synthetic",
                "--sample-file", str(HERE / "made_up.csv"), "--json",
            )  # fmt: skip
            listing_id = json.loads(out)["listing_id"]
            wait_until(lambda: online(registry_url, listing_id), "the host's heartbeat", 30)
            with urllib.request.urlopen(f"{registry_url}/listings/{listing_id}", timeout=10) as r:
                page = r.read()
            print(f"[browser  ] GET /listings/{listing_id}: {len(page) / 1024:.1f} KB of HTML")
            print("\n-- a scientist who was never sent an ID finds it and connects --")
            scientist = [str(HERE / "scientist.py")]
            out = run(demo, "scientist", scientist_home, [*scientist, "find", registry_url])
            request_id = REQUEST.search(out)[1]  # type: ignore[index]
            print("\n-- the owner answers the session request --")
            wait_until(lambda: request_id in duet_host(demo, owner_home, config, "inbox"),
                       "the request in the host's inbox", 30)  # fmt: skip
            duet_host(demo, owner_home, config, "inbox", "accept", request_id)
            print("\n-- the scientist sees the agreed time, in their own time zone --")
            run(demo, "scientist", scientist_home, [*scientist, "sessions", registry_url])
        except DemoFailed as exc:
            print(f"demo-registry failed: {exc}")
            return 1
        print(f"\ndone in {time.monotonic() - started:.0f} s: the registry held a signed "
              "description only; the data never left the host.")  # fmt: skip
        return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
