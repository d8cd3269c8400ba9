"""Benchmark peers: separate OS processes driven by JSON-line commands.

The coordinator starts ``python -m benchmarks._peers MODULE:FACTORY``. The peer calls
``FACTORY()`` for its command table and answers one command per line on stdin. Replies and
events go to a dedicated pipe (so duet_p2p's own printed lines never mix with them); a
peer's stdout and stderr are kept as its log and shown when it fails.

Also here: the loopback setup every peer shares, a raw aiortc link (two peer connections,
offer and answer passed directly) used as the baseline, and RSS readings from /proc.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPLY_FD_ENV = "DUET_BENCH_REPLY_FD"
LOOPBACK = "127.0.0.1"
Handlers = dict[str, Callable[..., Any]]


class PeerFailed(RuntimeError):
    """A peer process answered with an error, died, or did not answer in time."""


# -- coordinator side ----------------------------------------------------------------------


class Peer:
    """One peer process and its command pipe."""

    def __init__(self, factory: str, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        read_fd, write_fd = os.pipe()
        full_env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT),
            "DUET_ICE_HOST_ADDRESSES": LOOPBACK,
            REPLY_FD_ENV: str(write_fd),
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._peers", factory],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            cwd=str(ROOT),
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read_replies, args=(read_fd,), daemon=True).start()
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_replies(self, fd: int) -> None:
        with os.fdopen(fd, "r", encoding="utf-8") as stream:
            for line in stream:
                self._replies.put(json.loads(line))
        self._replies.put(None)

    def _read_log(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            del self.log[:-200]

    def send(self, cmd: str, **args: Any) -> None:
        """Send one command."""
        self.send_input(cmd=cmd, **args)

    def send_input(self, **fields: Any) -> None:
        """One line for a peer inside a command that waits on ``read_input``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(fields) + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float) -> dict[str, Any]:
        """The next reply or event from the peer."""
        try:
            item = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise self._failure(f"no answer within {timeout:g} s") from None
        if item is None:
            raise self._failure(f"exited with code {self.proc.wait(5)}")
        if "error" in item:
            raise self._failure(item["error"] + "\n" + item.get("trace", ""))
        return item

    def event(self, name: str, timeout: float = 60.0) -> Any:
        """Wait for the event ``name`` (announced by the peer with ``emit_event``)."""
        item = self.next(timeout)
        if item.get("event") != name:
            raise self._failure(f"expected event {name!r}, got {item!r}")
        return item.get("value")

    def result(self, timeout: float = 120.0) -> Any:
        item = self.next(timeout)
        if "result" not in item:
            raise self._failure(f"expected a result, got {item!r}")
        return item["result"]

    def call(self, cmd: str, timeout: float = 120.0, **args: Any) -> Any:
        """Run one command and return its result."""
        self.send(cmd, **args)
        return self.result(timeout)

    def _failure(self, what: str) -> PeerFailed:
        tail = "\n".join(self.log[-30:])
        return PeerFailed(f"peer {self.name}: {what}\n--- its log ---\n{tail}")

    def close(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.send("exit")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def peers(*specs: tuple[str, str]) -> Iterator[list[Peer]]:
    """Start one peer per (factory, name); stop them all afterwards."""
    started: list[Peer] = []
    try:
        for factory, name in specs:
            started.append(Peer(factory, name))
        yield started
    finally:
        for peer in reversed(started):
            peer.close()


@contextlib.contextmanager
def signaling_server(*extra: str) -> Iterator[str]:
    """A signaling server process on 127.0.0.1 with a free port (and ``extra`` flags);
    yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "signaling_server", "--port", "0", "--rate", "1000",
         "--burst", "5000", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 20
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            for word in line.split():
                if word.startswith("http://"):
                    url = word
        if url is None:
            raise PeerFailed("the signaling server did not start")
        threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()  # type: ignore[union-attr]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def connect_raw(
    offerer: Peer, answerer: Peer, framed: bool = False, options: dict[str, Any] | None = None
) -> float:
    """Open a raw aiortc link between two peers; returns the answerer's seconds from
    receiving the offer to its channel being open (the baseline of join_duet).

    With ``framed`` both ends wrap the channel in DataChannelTransport(ChannelOptions(
    **options))."""
    offer = offerer.call("raw_offer", framed=framed, options=options)
    answer = answerer.call("raw_answer", sdp=offer, framed=framed, options=options)
    offerer.call("raw_complete", sdp=answer)
    seconds = answerer.call("raw_wait_open")
    offerer.call("raw_wait_open")
    return float(seconds)


def connect_duet(
    owner: Peer, scientist: Peer, url: str, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Owner launches, scientist joins (IDs passed on as two people would); returns the
    scientist's timings: ``join_s`` (join_duet call to return) and ``open_s`` (to channel
    open)."""
    owner.send("launch", url=url, options=options)
    duet_id = owner.event("duet_id")
    scientist.send("join", duet_id=duet_id, url=url, options=options)
    client_id = scientist.event("client_id")
    owner.send_input(client_id=client_id)
    owner.result(60)
    return scientist.result(60)


def disconnect_duet(owner: Peer, scientist: Peer) -> None:
    scientist.call("close")
    owner.call("close")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- peer side -----------------------------------------------------------------------------

_reply_lock = threading.Lock()
_reply_stream: Any = None


def emit(payload: dict[str, Any]) -> None:
    global _reply_stream
    with _reply_lock:
        if _reply_stream is None:
            _reply_stream = os.fdopen(int(os.environ[REPLY_FD_ENV]), "w", encoding="utf-8")
        _reply_stream.write(json.dumps(payload) + "\n")
        _reply_stream.flush()


def emit_event(name: str, value: Any = None) -> None:
    """Tell the coordinator something mid-command (e.g. an ID it must pass on)."""
    emit({"event": name, "value": value})


def read_input() -> dict[str, Any]:
    """The next line from the coordinator, inside a running command."""
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)
    return json.loads(line)


def serve(handlers: Handlers) -> None:
    """Answer commands until ``exit`` or end of input."""
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        cmd = message.pop("cmd")
        if cmd == "exit":
            emit({"result": None})
            break
        try:
            handler = handlers[cmd]
            emit({"result": handler(**message)})
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator
            emit({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})


def run(coro: Any, timeout: float | None = 300.0) -> Any:
    """Run ``coro`` on duet_p2p's runtime loop (uvloop when installed), as the library does."""
    from duet_p2p.runtime import get_runtime

    return get_runtime().run(coro, timeout=timeout)


def loop_name() -> str:
    from duet_p2p.runtime import get_runtime

    loop = get_runtime().loop
    return f"{type(loop).__module__}.{type(loop).__name__}"


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    """Resident set size now."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> int:
    """Restart the peak-RSS counter (Linux: clear_refs 5); returns the RSS now."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset_peak_rss()."""
    return _status_kib("VmHWM") * 1024


_profiler: Any = None


def profile_start() -> None:
    """Start cProfile on the runtime's loop thread (where all the I/O runs)."""
    import cProfile

    global _profiler
    _profiler = cProfile.Profile()

    async def enable() -> None:
        _profiler.enable()

    run(enable())


def profile_stop(path: str) -> None:
    """Stop profiling and write the stats to ``path`` (for pstats)."""

    async def disable() -> None:
        _profiler.disable()

    run(disable())
    _profiler.dump_stats(path)


def common_handlers() -> Handlers:
    """Commands every peer answers."""
    return {
        "profile_start": profile_start,
        "profile_stop": profile_stop,
        "loop": loop_name,
        "cpu": time.process_time,
        "rss": rss_bytes,
        "reset_peak_rss": reset_peak_rss,
        "peak_rss": peak_rss_bytes,
        "ping": lambda: "pong",
    }


class RawLink:
    """Peer side of a plain aiortc connection: the same channel duet_p2p negotiates, with
    nothing of ours on top (or, with ``framed``, wrapped in our DataChannelTransport)."""

    def __init__(self) -> None:
        self.pc: Any = None
        self.channel: Any = None
        self.transport: Any = None
        self._started = 0.0
        self._opened: Any = None

    def handlers(self) -> Handlers:
        return {
            "raw_offer": self.offer,
            "raw_answer": self.answer,
            "raw_complete": self.complete,
            "raw_wait_open": self.wait_open,
            "raw_close": self.close,
            "sctp_stats": self.sctp_stats,
        }

    def sctp_stats(self) -> dict[str, int]:
        """aiortc's SCTP congestion state (to explain what a measurement saw)."""
        sctp = self.pc.sctp
        return {
            "cwnd": sctp._cwnd,
            "ssthresh": sctp._ssthresh,
            "flight_size": sctp._flight_size,
            "sent_queue": len(sctp._sent_queue),
            "outbound_queue": len(sctp._outbound_queue),
        }

    def _new(self, framed: bool, options: dict[str, Any] | None = None) -> None:
        from duet_p2p.transport.peer import new_peer_connection, restrict_host_addresses

        restrict_host_addresses([LOOPBACK])
        self.pc, self.channel = new_peer_connection([])
        self._opened = None
        if framed:
            from duet_p2p.transport.channel import ChannelOptions, DataChannelTransport

            self.transport = DataChannelTransport(
                self.pc, self.channel, ChannelOptions(**(options or {}))
            )
        else:
            self.transport = None

    def _watch_open(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        self._opened = loop.create_future()

        @self.channel.on("open")
        def _on_open() -> None:
            if not self._opened.done():
                self._opened.set_result(time.perf_counter())

    def offer(self, framed: bool = False, options: dict[str, Any] | None = None) -> str:
        async def go() -> str:
            self._new(framed, options)
            self._watch_open()
            await self.pc.setLocalDescription(await self.pc.createOffer())
            return self.pc.localDescription.sdp

        return run(go())

    def answer(self, sdp: str, framed: bool = False, options: dict[str, Any] | None = None) -> str:
        from aiortc import RTCSessionDescription

        async def go() -> str:
            self._started = time.perf_counter()
            self._new(framed, options)
            self._watch_open()
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await self.pc.setLocalDescription(await self.pc.createAnswer())
            return self.pc.localDescription.sdp

        return run(go())

    def complete(self, sdp: str) -> None:
        from aiortc import RTCSessionDescription

        async def go() -> None:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

        run(go())

    def wait_open(self, timeout: float = 20.0) -> float:
        import asyncio

        async def go() -> float:
            opened = await asyncio.wait_for(self._opened, timeout)
            if self.transport is not None:
                self.transport.activate()
            return opened - self._started

        return run(go())

    def close(self) -> None:
        async def go() -> None:
            if self.transport is not None:
                await self.transport.close()
            elif self.pc is not None:
                await self.pc.close()

        run(go(), timeout=30)
        self.pc = self.channel = self.transport = None


class DuetPeer:
    """Peer side of a Duet session (owner or scientist), through the public sync API."""

    def __init__(self) -> None:
        import tempfile

        self.duet: Any = None
        self.objects: dict[str, Any] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="duet-bench-")
        self._sessions = 0
        self.owner_options: dict[str, Any] = {}
        """Further ``launch_duet`` arguments for the owner."""

    def handlers(self) -> Handlers:
        return {
            "launch": self.launch,
            "join": self.join,
            "close": self.close,
            "host": self.host,
            "accept_all": self.accept_all,
            "find": self.find,
        }

    @staticmethod
    def _channel(options: dict[str, Any] | None) -> Any:
        from duet_p2p.transport.channel import ChannelOptions

        return ChannelOptions(**options) if options else None

    def launch(self, url: str, options: dict[str, Any] | None = None) -> None:
        """Owner: launch_duet; the Client ID comes from the coordinator."""
        import duet_p2p as sy

        def confirm(duet_id: str) -> str:
            emit_event("duet_id", duet_id)
            return str(read_input()["client_id"])

        self._sessions += 1
        audit = Path(self._dir.name) / f"audit-{self._sessions}.jsonl"
        self.duet = sy.launch_duet(
            url, client_id_callback=confirm, audit_path=audit, channel=self._channel(options),
            **self.owner_options,
        )  # fmt: skip

    def join(self, duet_id: str, url: str, options: dict[str, Any] | None = None) -> dict:
        """Scientist: join_duet, timed from the call to its return."""
        import duet_p2p as sy

        started = time.perf_counter()
        self.duet = sy.join_duet(
            duet_id,
            url,
            on_client_id=lambda client_id: emit_event("client_id", client_id),
            channel=self._channel(options),
        )
        joined = time.perf_counter() - started
        return {"join_s": joined, "open_s": self.duet._connection.connect_seconds}

    def close(self) -> None:
        if self.duet is not None:
            self.duet.close()
        self.duet = None
        self.objects.clear()

    def host(self, tag: str, nbytes: int, dtype: str = "float32") -> int:
        """Owner: host a private tensor of about ``nbytes`` bytes under ``tag``."""
        import torch

        kind = getattr(torch, dtype)
        count = max(1, nbytes // torch.empty((), dtype=kind).element_size())
        value = (
            torch.rand(count).to(kind) if kind.is_floating_point else torch.zeros(count, dtype=kind)
        )
        self.objects[tag] = value
        self.duet.send(value, tags=(tag,))
        return value.numel() * value.element_size()

    def accept_all(self) -> None:
        """Owner: an accept handler for every request."""
        self.duet.requests.add_handler("accept")

    def find(self, tag: str, timeout: float = 20.0) -> str:
        """Scientist: the pointer to the hosted object tagged ``tag``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pointer = self.duet.store.refresh()[tag]
                break
            except (KeyError, IndexError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.objects[tag] = pointer
        return pointer.id


def main(argv: list[str]) -> None:
    module_name, _, factory_name = argv[1].partition(":")
    module = importlib.import_module(module_name)
    handlers: Handlers = {**common_handlers(), **getattr(module, factory_name)()}
    serve(handlers)


if __name__ == "__main__":
    main(sys.argv)


def print_standalone(result: dict[str, Any], rows: Any, markdown_section: Any) -> int:
    """What ``python -m benchmarks.<one>`` prints: the JSON, the table, the report section."""
    import json

    print(json.dumps(result, indent=2, default=str))
    table = rows(result)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print()
    for row in table:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
    print()
    print(markdown_section(result))
    return 0
