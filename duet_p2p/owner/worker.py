"""The monitor's handle on a session's worker process: start it, limit it, feed it, police it.

A worker is forked by the fork server (``zygote``: a fresh interpreter that has imported
torch, never a fork of the owner's notebook), which starts as soon as the owner launches,
so importing torch overlaps the connection setup and a replacement takes milliseconds.
Where there is no fork server, workers are spawned and a spare is kept warm. Limits are the kernel's, not Python checks: the
address space (``prlimit`` from here, so the worker cannot pick it), and time, by a
watchdog that reads which item the worker is on and since when, and kills it past that
item's budget. A worker that dies, for whatever reason, is replaced; the scientist's
objects that lived in it are lost (and the session says so), the owner loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from duet_p2p.errors import DuetError, ProtocolError
from duet_p2p.limits import OwnerLimits
from duet_p2p.owner import zygote
from duet_p2p.owner.ipc import AsyncChannel

log = logging.getLogger(__name__)
PROGRESS = struct.Struct("<QQ")
STEPS = struct.Struct("<QQ")
PROGRESS_BYTES = PROGRESS.size + STEPS.size
"""The shared progress page (duet_p2p.owner.worker_main): the item running and since when,
then the steps done and in all of the plan running."""
WATCH_INTERVAL = 0.05
"""Seconds between the watchdog's looks at the worker."""
START_TIMEOUT = 120.0
"""Seconds a new worker may take to import torch and say it is ready."""
SNAP_SECONDS = 120.0
"""Time budget for encoding one value for release."""
_ENV_KEEP = ("PATH", "HOME", "LANG", "TMPDIR", "LD_LIBRARY_PATH", "VIRTUAL_ENV")
_ENV_PREFIXES = ("LC_", "OPENBLAS_", "MKL_", "KMP_")


class WorkerLost(DuetError):
    """The worker stopped (time budget, memory, crash); what it held is gone."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def _worker_env(threads: int) -> dict[str, str]:
    """A small environment: the owner's secrets in environment variables stay behind."""
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP or k.startswith(_ENV_PREFIXES)}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONNOUSERSITE="1",
        MALLOC_ARENA_MAX="2",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
    )
    return env


@dataclass
class WorkerProcess:
    """One worker process and the monitor's ends of its channels."""

    pid: int
    channel: AsyncChannel
    fd_sock: socket.socket
    progress: mmap.mmap
    pidfd: int = -1
    """Signals go through it (no PID reuse); readable once the process has ended."""
    popen: subprocess.Popen[bytes] | None = None
    """Set when spawned directly (no fork server on this system)."""
    sandbox: str = "starting"

    @classmethod
    async def spawn(cls, limits: OwnerLimits) -> WorkerProcess:
        ours, theirs = socket.socketpair()
        fd_ours, fd_theirs = socket.socketpair()
        progress_fd = os.memfd_create("duet-progress", os.MFD_CLOEXEC)
        popen = None
        pidfd = -1
        try:
            os.ftruncate(progress_fd, PROGRESS_BYTES)
            progress = mmap.mmap(progress_fd, PROGRESS_BYTES)
            passed = [theirs.fileno(), fd_theirs.fileno(), progress_fd]
            env = _worker_env(limits.worker_threads)
            if zygote.supported():
                server = await asyncio.to_thread(zygote.shared, env)
                pid = await asyncio.to_thread(server.fork, passed, START_TIMEOUT)
                pidfd = os.pidfd_open(pid)
            else:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "duet_p2p.owner.worker_main", *map(str, passed)],
                    pass_fds=passed, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
                pid = popen.pid
        finally:
            theirs.close()
            fd_theirs.close()
            os.close(progress_fd)
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=2**20)
        channel = AsyncChannel(reader, writer, max_attachment=_max_attachment(limits))
        return cls(pid, channel, fd_ours, progress, pidfd, popen)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            if self.pidfd >= 0:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            elif self.popen is not None:
                self.popen.send_signal(signal.SIGKILL)

    def wait(self, timeout: float) -> bool:
        """Wait for the process to end; whether it did."""
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
            return self.popen.poll() is not None
        if self.pidfd < 0:
            return True
        readable, _, _ = select.select([self.pidfd], [], [], timeout)
        return bool(readable)

    def cause_of_exit(self) -> str:
        code = self.popen.poll() if self.popen is not None else None
        if code is None:
            return "stopped unexpectedly (it crashed, or reached its memory limit)"
        if code == -signal.SIGKILL:
            return "was killed (it may have run out of memory)"
        if code < 0:
            return f"crashed (signal {-code})"
        return f"exited with status {code}"

    def close(self) -> None:
        self.kill()
        self.channel.close()
        self.fd_sock.close()
        self.wait(5)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _max_attachment(limits: OwnerLimits) -> int:
    return limits.max_result_bytes + 64 * 1024**2


def _vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class _Pending:
    head: dict[str, Any]
    attachment: Any = None
    fd: int = -1
    budgets: list[tuple[float, str]] = field(default_factory=list)


class WorkerSupervisor:
    """Keeps one worker serving a session: replaces it when it dies, polices its time."""

    def __init__(
        self,
        limits: OwnerLimits,
        config: dict[str, Any],
        *,
        on_done: Callable[[Any], None],
        on_lost: Callable[[str, bool], Awaitable[None]],
        rehost: Callable[[], Awaitable[None]],
    ) -> None:
        self.limits = limits
        self.config = config
        self.on_done = on_done
        self.on_lost = on_lost
        self.rehost = rehost
        self.current: WorkerProcess | None = None
        self.restarts = 0
        self.hosted_bytes = 0
        self.stopped = False
        self.sandbox = "starting"
        self._spare: asyncio.Task[WorkerProcess] | None = None
        self._pending: list[_Pending] | None = []
        """Frames waiting for a worker (None while one is serving)."""
        self._item = 0
        self._budgets: dict[int, tuple[float, str]] = {}
        self._kill_cause: str | None = None
        self._waiting: dict[int, asyncio.Future[tuple[dict[str, Any], Any]]] = {}
        self._next_key = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._generation = 0

    # -- life -----------------------------------------------------------------------------

    def prestart(self) -> None:
        """Start a worker now (importing torch takes a second) so one is ready later."""
        if self._spare is None and not self.stopped:
            self._spare = asyncio.ensure_future(WorkerProcess.spawn(self.limits))

    async def warm(self) -> None:
        """Wait until a prestarted worker is ready to be brought into service."""
        self.prestart()
        if self._spare is not None:
            await asyncio.shield(self._spare)

    async def start(self) -> None:
        """Bring a worker into service (the spare, if one is warm)."""
        self.prestart()
        assert self._spare is not None
        spare, self._spare = self._spare, None
        worker = await spare
        try:
            await self._configure(worker)
        except BaseException:
            worker.close()
            raise
        self.current = worker
        self._item = 0
        self._budgets.clear()
        self._kill_cause = None
        self._generation += 1
        generation = self._generation
        self._tasks = [
            asyncio.ensure_future(self._read(worker, generation)),
            asyncio.ensure_future(self._watch(worker, generation)),
        ]
        pending, self._pending = self._pending or [], None
        await self.rehost()
        for frame in pending:
            self._write(frame)
        if not zygote.supported():
            self.prestart()  # a spawned spare takes a second to be ready

    async def _configure(self, worker: WorkerProcess) -> None:
        head, _ = await asyncio.wait_for(worker.channel.recv(), START_TIMEOUT)
        if head.get("t") != "ready":
            raise ProtocolError("the worker did not start properly")
        worker.channel.send(dict(self.config, t="config"))
        head, _ = await asyncio.wait_for(worker.channel.recv(), START_TIMEOUT)
        if head.get("t") != "sandboxed":
            raise ProtocolError("the worker did not confine itself")
        worker.sandbox = self.sandbox = str(head.get("state", ""))[:200]
        if worker.sandbox != "seccomp":
            log.warning("worker %d runs without a system-call filter: %s", worker.pid,
                        worker.sandbox)  # fmt: skip
        self._base_vm = _vm_size(worker.pid)
        self._limit_memory(worker)

    def _limit_memory(self, worker: WorkerProcess) -> None:
        """The worker's address space: what it had, the hosted data, the peer's budget."""
        if not hasattr(resource, "prlimit"):
            return
        soft = self._base_vm + self.hosted_bytes + 2 * self.limits.max_peer_bytes  # two budgets
        soft += self.limits.worker_memory_slack
        hard = resource.RLIM_INFINITY if worker.sandbox == "seccomp" else soft
        try:
            resource.prlimit(worker.pid, resource.RLIMIT_AS, (soft, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not limit worker %d's memory: %s", worker.pid, exc)

    async def close(self) -> None:
        self.stopped = True
        for task in self._tasks:
            task.cancel()
        if self.current is not None:
            with contextlib.suppress(Exception):
                self.current.channel.send({"t": "stop"})
            self.current.close()
            self.current = None
        if self._spare is not None:
            spare, self._spare = self._spare, None
            with contextlib.suppress(BaseException):
                (await spare).close()
        self._fail_waiting("the session closed")

    # -- sending --------------------------------------------------------------------------

    def send(
        self,
        head: dict[str, Any],
        attachment: Any = None,
        *,
        fd: int = -1,
        budgets: list[tuple[float, str]] | None = None,
    ) -> None:
        """Queue a frame for the worker, in order; ``budgets``: one (seconds, what) per
        work item it holds."""
        if self.stopped:
            raise WorkerLost("the session's worker has stopped for good")
        frame = _Pending(head, attachment, fd, budgets or [])
        if self._pending is not None:
            self._pending.append(frame)
        else:
            self._write(frame)

    def _write(self, frame: _Pending) -> None:
        worker = self.current
        if worker is None:
            return
        for budget in frame.budgets:
            self._item += 1
            self._budgets[self._item] = budget
        try:
            if frame.fd >= 0:
                socket.send_fds(worker.fd_sock, [b"f"], [frame.fd])
            worker.channel.send(frame.head, frame.attachment)
        except OSError:
            worker.kill()  # the reader notices and replaces it

    async def drain(self) -> None:
        worker = self.current
        if worker is not None and self._pending is None:
            with contextlib.suppress(ConnectionError, OSError):
                await worker.channel.drain()

    def ask(
        self, head: dict[str, Any], budget: tuple[float, str] | None = None
    ) -> asyncio.Future[tuple[dict[str, Any], Any]]:
        """Send a frame the worker answers, now, in order; the future gets (head,
        attachment), or WorkerLost."""
        key = self._next_key = self._next_key + 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        future.add_done_callback(lambda _f: self._waiting.pop(key, None))
        try:
            self.send(dict(head, key=key), budgets=[budget] if budget else None)
        except WorkerLost as lost:
            future.set_exception(lost)
        return future

    def plan_steps(self) -> tuple[int, int]:
        """(steps done, steps in all) of the plan the worker runs now, as the worker wrote
        them (untrusted: callers clamp); (0, 0) when it runs none."""
        worker = self.current
        if worker is None:
            return 0, 0
        try:
            done, total = STEPS.unpack_from(worker.progress, PROGRESS.size)
        except (ValueError, struct.error):
            return 0, 0
        return int(done), int(total)

    def set_hosted_bytes(self, total: int) -> None:
        self.hosted_bytes = total
        if self.current is not None:
            self._limit_memory(self.current)

    # -- receiving and policing -----------------------------------------------------------

    async def _read(self, worker: WorkerProcess, generation: int) -> None:
        try:
            while True:
                head, attachment = await worker.channel.recv()
                kind = head["t"]
                if kind == "done":
                    self.on_done(head.get("failed"))
                elif kind in ("snap", "sync"):
                    future = self._waiting.get(head.get("key"))  # type: ignore[arg-type]
                    if future is not None and not future.done():
                        future.set_result((head, attachment))
                else:
                    raise ProtocolError(f"unexpected frame {kind[:40]!r} from the worker")
        except asyncio.CancelledError:
            raise
        except (EOFError, asyncio.IncompleteReadError, ConnectionError, ProtocolError,
                OSError, KeyError) as exc:  # fmt: skip
            if isinstance(exc, ProtocolError):
                log.warning("worker %d broke the protocol: %s", worker.pid, exc)
            await self._replace(worker, generation)

    async def _watch(self, worker: WorkerProcess, generation: int) -> None:
        while generation == self._generation:
            await asyncio.sleep(WATCH_INTERVAL)
            item, started = PROGRESS.unpack_from(worker.progress, 0)
            for done in [k for k in self._budgets if k < item]:
                del self._budgets[done]
            if not started:
                continue
            budget, what = self._budgets.get(item, (self.limits.max_op_seconds, "an item"))
            if time.monotonic_ns() - started > budget * 1e9:
                self._kill_cause = f"{what} ran past its {budget:g} s time budget"
                worker.kill()
                return

    async def _replace(self, worker: WorkerProcess, generation: int) -> None:
        if generation != self._generation or self.stopped:
            return
        self._generation += 1
        await asyncio.to_thread(_reap, worker)
        cause = self._kill_cause or f"the worker {worker.cause_of_exit()}"
        log.warning("worker %d lost: %s", worker.pid, cause)
        worker.close()
        self.current = None
        self._pending = []
        self._fail_waiting(cause)
        self.restarts += 1
        final = self.restarts > self.limits.max_worker_restarts
        if final:
            self.stopped = True
        await self.on_lost(cause, final)
        if not final:
            try:
                await self.start()
            except Exception as exc:  # noqa: BLE001 - no worker: the session cannot serve
                log.error("could not start a new worker: %s", exc)
                self.stopped = True
                await self.on_lost(f"no new worker could be started ({exc})", True)

    def _fail_waiting(self, cause: str) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(WorkerLost(cause))


def _reap(worker: WorkerProcess) -> None:
    worker.wait(5)
