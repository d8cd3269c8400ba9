"""A fork server for workers: one process that has imported torch, forking one per session.

Importing torch takes about a second; forking a process that already has takes a few
milliseconds. The fork server is spawned (never forked from the owner's notebook) the
first time an owner launches in this interpreter, holds nothing but imported modules, and
forks a worker for each session, handing it the session's sockets. It reaps its children
itself, so the monitor learns of a worker's end from a pidfd, and signals it only through
that pidfd (never a PID that may have been reused).

Where fork servers cannot work (no ``os.pidfd_open``), workers are spawned one by one.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading

_PID = struct.Struct("<q")
_ENTRY = "import sys; from duet_p2p.owner.zygote import serve; serve(int(sys.argv[1]))"
_lock = threading.Lock()
_shared: Zygote | None = None


def supported() -> bool:
    return hasattr(os, "pidfd_open") and hasattr(socket, "send_fds") and hasattr(os, "fork")


class Zygote:
    """The monitor's handle on the fork server."""

    def __init__(self, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", _ENTRY, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            theirs.close()
        self.ctrl = ours
        self.ready = False
        self._lock = threading.Lock()

    def fork(self, fds: list[int], timeout: float) -> int:
        """A new worker process running on ``fds`` (its socket, fd socket, progress)."""
        with self._lock:
            self.ctrl.settimeout(timeout)
            if not self.ready:
                if self.ctrl.recv(5) != b"ready":
                    raise OSError("the worker fork server did not start")
                self.ready = True
            socket.send_fds(self.ctrl, [b"f"], fds)
            data = self.ctrl.recv(_PID.size)
            if len(data) != _PID.size:
                raise OSError("the worker fork server stopped")
            return int(_PID.unpack(data)[0])

    def alive(self) -> bool:
        return self.popen.poll() is None


def shared(env: dict[str, str]) -> Zygote:
    """This interpreter's fork server, started on first use (and again if it died)."""
    global _shared
    with _lock:
        if _shared is None or not _shared.alive():
            _shared = Zygote(env)
        return _shared


def serve(ctrl_fd: int) -> None:
    ctrl = socket.socket(fileno=ctrl_fd)
    import torch  # noqa: F401 - the point of this process

    from duet_p2p.owner import worker_main
    from duet_p2p.owner.execution.sizes import _meta_add

    worker_main.preload()
    _meta_add()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    ctrl.sendall(b"ready")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(ctrl, 1, 3)
        except OSError:
            return
        if not message:
            return  # the owner's process is gone
        pid = os.fork()
        if pid == 0:
            ctrl.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 1
            try:
                worker_main.serve_on(*fds)
                code = 0
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        ctrl.sendall(_PID.pack(pid))
