"""A worker process: runs one scientist's actions on read-only copies of the hosted data.

Started by the monitor (``python -m duet_p2p.owner.worker_main SOCK FDSOCK PROGRESS``), it
imports torch, says it is ready, receives its configuration, gives up what it does not
need (``sandbox``) and then serves frames from the monitor in order: hosted data (sealed
memory mapped read-only), the scientist's actions, uploads, frees, and snapshots of
values the monitor wants to release. It is untrusted by design: it decides nothing about
privacy, holds no connection and no secrets beyond the data it was given, and the monitor
kills it when an item overruns its time budget.

Before each work item it writes (item number, start time) into a small shared memory
block, which is how the monitor's watchdog knows which item is running and since when.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

PROGRESS = struct.Struct("<QQ")
"""At offset 0 of the shared progress page: the item running, and since when (ns)."""
STEPS = struct.Struct("<QQ")
"""At offset ``PROGRESS.size``: steps done and in all of the plan running."""
PROGRESS_BYTES = PROGRESS.size + STEPS.size


@dataclass(slots=True)
class Step:
    """One action as the monitor forwards it (already checked there; cheaper than a model)."""

    op: str
    result: str
    target: Any
    args: list[Any]
    kwargs: dict[str, Any]
    no_grad: bool
    private: bool = False
    """The monitor labelled its result private: it counts against the private budget."""


def preload() -> None:
    """Import what a configured worker needs, so the children of a fork server share
    these pages instead of each importing its own copy."""
    from duet_p2p.allowlist import DEFAULT_ALLOWLIST  # noqa: F401
    from duet_p2p.limits import OwnerLimits  # noqa: F401
    from duet_p2p.owner import sandbox  # noqa: F401
    from duet_p2p.owner.execution.executor import Executor  # noqa: F401
    from duet_p2p.store import OwnerStore  # noqa: F401


def main() -> None:
    serve_on(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))


def serve_on(sock_fd: int, fd_sock_fd: int, progress_fd: int) -> None:
    """Serve the monitor on these descriptors until it closes the channel."""
    sock = socket.socket(fileno=sock_fd)
    fd_sock = socket.socket(fileno=fd_sock_fd)
    progress = mmap.mmap(progress_fd, PROGRESS_BYTES)
    os.close(progress_fd)
    from duet_p2p.owner.ipc import BlockingChannel

    channel = BlockingChannel(sock)
    import torch  # the slow part when spawned (about a second); instant when forked

    from duet_p2p.owner.execution.sizes import _meta_add

    _meta_add()
    channel.send({"t": "ready", "pid": os.getpid()})
    head, _ = channel.recv()
    if head.get("t") != "config":
        return
    worker = Worker(channel, fd_sock, progress, head)
    torch.manual_seed(int.from_bytes(os.urandom(8), "little"))
    worker.serve()


class Worker:
    """The worker's state: its own store and executor, and the items it has done."""

    def __init__(
        self, channel: Any, fd_sock: socket.socket, progress: mmap.mmap, config: dict[str, Any]
    ) -> None:
        import torch

        from duet_p2p.allowlist import DEFAULT_ALLOWLIST, AllowedOp, Allowlist
        from duet_p2p.limits import OwnerLimits
        from duet_p2p.owner import sandbox
        from duet_p2p.owner.execution.executor import Executor
        from duet_p2p.store import OwnerStore

        self.channel = channel
        self.fd_sock = fd_sock
        self.progress = progress
        self.read_only = bool(config.get("read_only", True))
        torch.set_num_threads(max(1, int(config.get("threads", 1))))
        torch.set_num_interop_threads(1)
        limits = OwnerLimits(**config["limits"])
        extra = config.get("allowlist")
        allowlist = Allowlist(AllowedOp(**entry) for entry in extra) if extra else DEFAULT_ALLOWLIST
        self.store = OwnerStore()
        self.executor = Executor(self.store, allowlist, limits, render_lineage=False)
        self.executor.on_step = self._step
        self.item = int(config.get("first_item", 0))
        self._maps: dict[str, mmap.mmap] = {}
        sandbox.limit_resources()
        state = sandbox.install_seccomp() if config.get("seccomp", True) else "seccomp off"
        channel.send({"t": "sandboxed", "state": state})

    # -- the loop -----------------------------------------------------------------------

    def serve(self) -> None:
        handlers = {
            "host": self._host,
            "host_module": self._host_module,
            "unhost": self._unhost,
            "run": self._run,
            "upload": self._upload,
            "free": self._free,
            "snap": self._snap,
            "sync": self._sync,
        }
        while True:
            try:
                head, attachment = self.channel.recv()
            except EOFError:
                return
            kind = head["t"]
            if kind == "stop":
                return
            handlers[kind](head, attachment)

    def _begin(self) -> None:
        self.item += 1
        STEPS.pack_into(self.progress, PROGRESS.size, 0, 0)
        PROGRESS.pack_into(self.progress, 0, self.item, time.monotonic_ns())

    def _step(self, done: int, total: int) -> None:
        """A plan's step finished (the monitor shows a job's progress from this)."""
        STEPS.pack_into(self.progress, PROGRESS.size, done, total)

    def _end(self) -> None:
        PROGRESS.pack_into(self.progress, 0, self.item, 0)

    # -- hosted data --------------------------------------------------------------------

    def _host(self, head: dict[str, Any], attachment: Any) -> None:
        import torch

        dtype = getattr(torch, head["dtype"])
        shape = tuple(head["shape"])
        nbytes = int(head["nbytes"])
        if attachment is not None:  # no shared memory on this system: our own copy
            value = torch.frombuffer(bytearray(attachment), dtype=dtype).reshape(shape)
        elif nbytes:
            _, fds, _, _ = socket.recv_fds(self.fd_sock, 1, 1)
            fd = fds[0]
            try:
                if self.read_only:
                    mapped = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                else:  # the owner allowed in-place changes: a private copy-on-write view
                    mapped = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE)
            finally:
                os.close(fd)
            self._maps[head["id"]] = mapped
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "the buffer is not writable": on purpose
                value = torch.frombuffer(mapped, dtype=dtype).reshape(shape)
        else:
            value = torch.zeros(shape, dtype=dtype)
        self._put_owner(head["id"], value)

    def _host_module(self, head: dict[str, Any], attachment: Any) -> None:
        from duet_p2p.modules import spec_to_module
        from duet_p2p.rpc import codec

        module = spec_to_module(codec.decode(attachment))  # each layer's own mode, as hosted
        self._put_owner(head["id"], module)

    def _put_owner(self, object_id: str, value: Any) -> None:
        from duet_p2p.store import StoredObject, value_nbytes

        self.store.put(
            StoredObject(
                id=object_id, value=value, origin="owner", private=False,
                nbytes=value_nbytes(value),
            )
        )  # fmt: skip

    def _unhost(self, head: dict[str, Any], _attachment: Any) -> None:
        self.store.remove(head["id"])
        self._maps.pop(head["id"], None)  # unmapped once no tensor uses it

    # -- the scientist's work -----------------------------------------------------------

    def _run(self, head: dict[str, Any], _attachment: Any) -> None:
        failed: list[list[Any]] = []
        for index, compact in enumerate(head["actions"]):
            action = Step(*compact)
            self._begin()
            try:
                record = self.executor.run(action)
            finally:
                self._end()
            if record.error is not None:
                failed.append([index, record.error])
        self.channel.send({"t": "done", "item": self.item, "failed": failed})

    def _upload(self, head: dict[str, Any], attachment: Any) -> None:
        import torch

        from duet_p2p.errors import DuetError
        from duet_p2p.modules import spec_to_module
        from duet_p2p.rpc import codec
        from duet_p2p.rpc.errors import error_info
        from duet_p2p.store import StoredObject, value_nbytes

        self._begin()
        failed: list[list[Any]] = []
        try:
            decoded = codec.decode(attachment)
            value = spec_to_module(decoded) if head.get("module") else decoded
            if not isinstance(value, (torch.Tensor, torch.nn.Module)):
                raise DuetError("an upload must be a tensor or a module spec")
            record = StoredObject(
                id=head["id"], value=value, origin="peer", private=False,
                nbytes=value_nbytes(value),
            )  # fmt: skip
            self.store.put(record)
        except (DuetError, ValueError, TypeError, KeyError) as exc:
            failed.append([0, error_info(exc, op="upload")])
        finally:
            self._end()
        self.channel.send({"t": "done", "item": self.item, "failed": failed})

    def _free(self, head: dict[str, Any], _attachment: Any) -> None:
        self.store.remove_peer_objects(head["ids"])

    def _sync(self, head: dict[str, Any], _attachment: Any) -> None:
        """A barrier: everything sent before it is done. Says what the worker holds."""
        reply: dict[str, Any] = {
            "t": "sync", "key": head["key"], "objects": self.store.peer_object_count(),
            "bytes": self.store.peer_bytes,
        }  # fmt: skip
        if head.get("detail"):
            records = self.store.peer_records()[:1_000_000]
            reply["ids"] = [r.id for r in records if r.error is None]
        self.channel.send(reply)

    def _snap(self, head: dict[str, Any], _attachment: Any) -> None:
        """Encode a value now, at its place in the order of the scientist's actions."""
        import torch

        from duet_p2p.modules import module_to_spec
        from duet_p2p.owner.encoding import encode_snapshot

        self._begin()
        reply: dict[str, Any] = {"t": "snap", "key": head["key"], "ok": False}
        payload = None
        try:
            record = self.store.get(head["id"])
            if record is None:
                reply["error"] = {
                    "code": "not_found",
                    "type": "KeyError",
                    "message": "no such object",
                }
            elif record.error is not None:
                reply["error"] = record.error
            else:
                value = record.value
                module = isinstance(value, torch.nn.Module)
                payload = encode_snapshot(module_to_spec(value) if module else value)
                reply.update(ok=True, module=module)
        except Exception as exc:  # noqa: BLE001 - an unencodable value is that value's error
            from duet_p2p.rpc.errors import error_info

            reply["error"] = error_info(exc, op="get")
        finally:
            self._end()
        self.channel.send(reply, payload)


if __name__ == "__main__":
    main()
