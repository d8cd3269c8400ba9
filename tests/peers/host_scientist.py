"""A scientist process for the standing-host tests, driven one command at a time.

    python host_scientist.py SIGNALING_URL        # DUET_HOME: this scientist's data dir

Reads one JSON command per line on stdin, ``{"id": N, "cmd": NAME, ...arguments}``, runs
each in a thread of its own (so a join that waits for the host's owner does not hold up the
others) and prints one JSON line per command on stdout: ``{"id": N, "ok": true, ...}`` or
``{"id": N, "ok": false, "error": TYPE, "message": TEXT}``. Everything else the library
prints goes to stderr. The first line printed is ``{"event": "ready"}``.

Sessions are named by the caller (``"session"``), so one process may hold several, each
joined with an identity of its own (``"identity"``: a key name in $DUET_HOME/identities).

Commands (arguments besides ``id`` and ``cmd``):
    identity name                  -> client_id, path, file_mode, dir_mode
    join session host_id identity  -> client_id, duet_id
    close session
    listing session                -> entries (the host's store listing)
    sum session tag timeout        -> value: store[tag].sum(), got through the handler
    make session tag name factor   -> object_id: objects[name] = store[tag] * factor
    upload session name values     -> object_id: objects[name] = duet.send(tensor(values))
    sum_of session name timeout    -> value: objects[name].sum().get()
    request session name           -> request_id: objects[name].get(request_block=False)
    result request_id timeout      -> value of that request, or its error
    status request_id              -> status of that request
    my_requests session            -> requests: this scientist's requests as the host lists
                                      them (id, status, kept), earlier sessions' included
    fetch session request_id       -> value accepted while away (duet.requests[id].get())
    raw session message reply      -> a message sent past the pointer layer, as encoded
                                      here; with ``reply`` its call_id is filled in and the
                                      owner's reply is returned as ``reply``
    notices                        -> count: error notices the owner sent so far
    exit

In a raw message, ``{"$ref": ID}`` stands for an object reference and
``{"$tensor": [...]}`` for a float tensor.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROTOCOL_OUT = sys.stdout
sys.stdout = sys.stderr  # the library's own prints must not mix with the JSON lines
os.environ.setdefault("DUET_ICE_HOST_ADDRESSES", "127.0.0.1")

import torch  # noqa: E402

import duet_p2p as sy  # noqa: E402
from duet_p2p.identity import Identity  # noqa: E402
from duet_p2p.rpc import codec  # noqa: E402
from duet_p2p.runtime import get_runtime  # noqa: E402

WAIT = 30.0
COMMANDS = frozenset({
    "identity", "join", "close", "listing", "sum", "make", "upload", "sum_of", "request",
    "result", "status", "my_requests", "fetch", "raw", "notices",
})  # fmt: skip
_print_lock = threading.Lock()


class Notices(logging.Handler):
    """Counts the owner's error notices (the endpoint logs each one)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "refused a message" in record.getMessage():
            self.count += 1


class Scientist:
    """The process's sessions, objects and requests, by the names the test gives."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sessions: dict[str, sy.Duet] = {}
        self.objects: dict[str, Any] = {}
        self.requests: dict[str, Any] = {}
        self.notices = Notices()
        logging.getLogger("duet_p2p.rpc.endpoint").addHandler(self.notices)

    def duet(self, command: dict[str, Any]) -> sy.Duet:
        return self.sessions[command["session"]]

    # -- commands --------------------------------------------------------------------

    def identity(self, c: dict[str, Any]) -> dict[str, Any]:
        who = Identity.load(c["name"])
        assert who.path is not None
        return {
            "client_id": who.id,
            "path": str(who.path),
            "file_mode": stat.S_IMODE(os.stat(who.path).st_mode),
            "dir_mode": stat.S_IMODE(os.stat(who.path.parent).st_mode),
        }

    def join(self, c: dict[str, Any]) -> dict[str, Any]:
        duet = sy.join_duet(c["host_id"], self.url, identity=c["identity"])
        self.sessions[c["session"]] = duet
        return {"client_id": duet.client_id, "duet_id": duet.duet_id}

    def close(self, c: dict[str, Any]) -> dict[str, Any]:
        self.sessions.pop(c["session"]).close()
        return {}

    def listing(self, c: dict[str, Any]) -> dict[str, Any]:
        store = self.duet(c).store.refresh()
        return {"entries": [{"id": e["id"], "tags": e["tags"]} for e in store._entries or []]}

    def sum(self, c: dict[str, Any]) -> dict[str, Any]:
        pointer = self.duet(c).store.refresh()[c["tag"]]
        return {"value": _plain(pointer.sum().get(timeout_secs=c.get("timeout", WAIT)))}

    def make(self, c: dict[str, Any]) -> dict[str, Any]:
        pointer = self.duet(c).store.refresh()[c["tag"]] * c["factor"]
        self.objects[c["name"]] = pointer
        return {"object_id": pointer.id}

    def upload(self, c: dict[str, Any]) -> dict[str, Any]:
        pointer = self.duet(c).send(torch.tensor(c["values"], dtype=torch.float32))
        self.objects[c["name"]] = pointer
        return {"object_id": pointer.id}

    def sum_of(self, c: dict[str, Any]) -> dict[str, Any]:
        value = self.objects[c["name"]].sum().get(timeout_secs=c.get("timeout", WAIT))
        return {"value": _plain(value)}

    def request(self, c: dict[str, Any]) -> dict[str, Any]:
        handle = self.objects[c["name"]].get(request_block=False)
        self.requests[handle.request_id] = handle
        return {"request_id": handle.request_id, "status": handle.status}

    def result(self, c: dict[str, Any]) -> dict[str, Any]:
        handle = self.requests[c["request_id"]]
        return {"value": _plain(handle.result(timeout=c.get("timeout", WAIT)))}

    def status(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.requests[c["request_id"]].status}

    def my_requests(self, c: dict[str, Any]) -> dict[str, Any]:
        rows = self.duet(c).requests
        return {"requests": [{"request_id": r.request_id, "status": r.status, "kept": r.kept}
                             for r in rows]}  # fmt: skip

    def fetch(self, c: dict[str, Any]) -> dict[str, Any]:
        value = self.duet(c).requests.get(c["request_id"], timeout=c.get("timeout", WAIT))
        return {"value": _plain(value)}

    def raw(self, c: dict[str, Any]) -> dict[str, Any]:
        core = self.duet(c)._core
        message = _decode_refs(c["message"])
        reply = get_runtime().run(_raw(core, message, c.get("reply", False)), timeout=WAIT + 5)
        return {"reply": reply}

    def notices_(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"count": self.notices.count}


async def _raw(core: Any, message: dict[str, Any], want_reply: bool) -> Any:
    """Send ``message`` as encoded here (no model checks it on this side); with
    ``want_reply``, give it a fresh call_id and return the owner's reply as it came."""
    import asyncio

    endpoint = core.endpoint
    future = None
    if want_reply:
        call_id = endpoint.next_call_id()
        message = {**message, "call_id": call_id}
        future = asyncio.get_running_loop().create_future()
        _capture_reply(endpoint, call_id, future)
    await core.connection.transport.send(b"\x00", codec.encode(message))
    if future is None:
        return None
    return await asyncio.wait_for(future, WAIT)


def _capture_reply(endpoint: Any, call_id: int, future: Any) -> None:
    """Route the reply to ``call_id`` to ``future`` whole (ok, value and error as sent)."""
    original = endpoint._on_reply

    def on_reply(reply: Any) -> None:
        if reply.call_id == call_id and not future.done():
            endpoint._on_reply = original
            future.set_result({"ok": reply.ok, "value": reply.value, "error": reply.error})
            return
        original(reply)

    endpoint._on_reply = on_reply


def _decode_refs(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$ref"}:
            return codec.ObjectRef(value["$ref"])
        if set(value) == {"$tensor"}:
            return torch.tensor(value["$tensor"], dtype=torch.float32)
        return {k: _decode_refs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_refs(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def _say(line: dict[str, Any]) -> None:
    text = json.dumps(line, default=str)
    with _print_lock:
        PROTOCOL_OUT.write(text + "\n")
        PROTOCOL_OUT.flush()


def _run(scientist: Scientist, command: dict[str, Any]) -> None:
    name = command.get("cmd")
    started = time.monotonic()
    try:
        if name not in COMMANDS:
            raise ValueError(f"unknown command {name!r}")
        result = getattr(scientist, "notices_" if name == "notices" else name)(command)
        _say({"id": command.get("id"), "ok": True, "seconds": time.monotonic() - started,
              **result})  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the test
        _say({"id": command.get("id"), "ok": False, "error": type(exc).__name__,
              "message": str(exc)[:2000], "seconds": time.monotonic() - started})  # fmt: skip


def main(url: str) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    scientist = Scientist(url)
    _say({"event": "ready", "pid": os.getpid(), "home": str(Path(os.environ["DUET_HOME"]))})
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if command.get("cmd") == "exit":
            break
        threading.Thread(target=_run, args=(scientist, command), daemon=True).start()
    for duet in list(scientist.sessions.values()):
        try:
            duet.close()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
