"""The control socket of a standing host: its owner administers it from another terminal.

A running host (``duet-host serve``) listens on an AF_UNIX stream socket, created 0600 in a
directory that only its user may write, and answers processes of that same user only
(checked with SO_PEERCRED on every connection). A connection carries exactly one request
line, a JSON object ``{"command": str, "args": {...}}`` of at most 64 KiB sent within 5 s,
and gets one response line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
"..."}``. Commands come from a fixed table; their arguments are checked (types, lengths,
ID forms) before the host sees them, and the host runs them on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from duet_p2p.errors import ConfigurationError, DuetError
from duet_p2p.registry.listing import (
    MAX_DESCRIPTION_CHARS,
    MAX_KEYWORD_CHARS,
    MAX_KEYWORDS,
    MAX_LICENSE_CHARS,
    MAX_LONG_TEXT_CHARS,
    MAX_SCHEMA_ENTRIES,
    MAX_SUMMARY_CHARS,
    MAX_TIME,
    MAX_URL_CHARS,
    MODALITIES,
)
from duet_p2p.registry.listing import MAX_NAME_CHARS as MAX_LISTING_NAME_CHARS
from duet_p2p.registry.sample import MAX_ROWS as MAX_SAMPLE_ROWS
from duet_p2p.registry.sample import MAX_TEXT_CHARS as MAX_SAMPLE_TEXT_CHARS
from duet_p2p.registry.session import MAX_MESSAGE_CHARS, MAX_PROPOSALS
from duet_p2p.text import printable

logger = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_SOCKET_PATH_BYTES = 100
"""Longer socket paths move to a short one under /tmp (AF_UNIX allows 108 bytes)."""
MAX_REQUEST_BYTES = 512 * 1024
"""Room for a publish: a 50,000-character description and a sample, JSON-escaped."""
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
REQUEST_TIMEOUT = 5.0
"""Seconds a client has, from connecting, to send its whole request line."""
WRITE_TIMEOUT = 30.0
MAX_CONCURRENT_COMMANDS = 8
MAX_CONNECTIONS = 64
"""Connections open at once (reading, waiting or running); more are refused at once."""
MAX_REASON_CHARS = 1000
MAX_TAG_CHARS = 200
MAX_AUDIT_LAST = 10_000
DEFAULT_AUDIT_LAST = 50
CLOSE_GRACE = 5.0
MAX_ERROR_CHARS = 2000
NOT_SERVING_HINT = "start it with `duet-host serve --config host.toml`"

_SHORT_BASE = Path("/tmp")
_PEERCRED = struct.Struct("3i")
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_JSON = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))


class HostControl(Protocol):
    """What a running host offers its owner. Each method returns plain JSON values or
    raises DuetError with a message for the owner; it runs on a worker thread."""

    def control_status(self) -> dict[str, Any]: ...

    def control_requests(self, all: bool) -> list[dict[str, Any]]: ...

    def control_accept(self, request_id: str) -> dict[str, Any]: ...

    def control_deny(self, request_id: str, reason: str) -> dict[str, Any]: ...

    def control_admissions(self) -> list[dict[str, Any]]: ...

    def control_admit(self, client_id: str) -> dict[str, Any]: ...

    def control_refuse(self, client_id: str, reason: str) -> dict[str, Any]: ...

    def control_audit(self, last: int) -> list[dict[str, Any]]: ...

    def control_jobs(self, all: bool) -> list[dict[str, Any]]: ...

    def control_job(self, job_id: str) -> dict[str, Any]: ...

    def control_approve(self, job_id: str) -> dict[str, Any]: ...

    def control_cancel(self, job_id: str) -> dict[str, Any]: ...

    def control_reject(self, job_id: str, reason: str) -> dict[str, Any]: ...

    def control_release(self, job_id: str) -> dict[str, Any]: ...

    def control_withhold(self, job_id: str, reason: str) -> dict[str, Any]: ...

    def control_publish(
        self, tag: str, name: str, summary: str, description: str, license: str,
        keywords: list[str], registry: str | None, modality: str | None,
        usage_conditions: str, citation: str | None, sample: dict[str, Any] | None,
    ) -> dict[str, Any]: ...  # fmt: skip

    def control_unpublish(self, tag: str, registry: str | None) -> dict[str, Any]: ...

    def control_listings(self) -> list[dict[str, Any]]: ...

    def control_inbox(self) -> dict[str, Any]: ...

    def control_inbox_accept(self, request_id: str, at: float | None) -> dict[str, Any]: ...

    def control_inbox_decline(self, request_id: str, reason: str) -> dict[str, Any]: ...

    def control_inbox_propose(
        self, request_id: str, times: list[float], message: str
    ) -> dict[str, Any]: ...


# --- where the socket lives -------------------------------------------------------------


def socket_path(host_dir: Path) -> Path:
    """``host_dir/control.sock``; when that is too long for AF_UNIX, a short path
    ``/tmp/duet-<uid>/<sha256(host_dir)[:16]>.sock`` in a private directory instead."""
    path = Path(host_dir) / SOCKET_NAME
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
        return path
    folder = _SHORT_BASE / f"duet-{os.getuid()}"
    _private_dir(folder)
    digest = hashlib.sha256(os.fsencode(os.path.abspath(host_dir))).hexdigest()[:16]
    return folder / f"{digest}.sock"


def _private_dir(folder: Path) -> None:
    """Create ``folder`` 0700; refuse it unless it is a real directory of ours, closed to
    others (someone else could otherwise plant or swap the socket)."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = os.lstat(folder)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or stat.S_IMODE(info.st_mode) & 0o077
    ):
        raise ConfigurationError(
            f"{folder} must be a directory of yours that no one else can open "
            f"(mode 700); refusing to put the control socket there"
        )


def _prepare_parent(folder: Path) -> None:
    """Create the socket's directory 0700 if needed; refuse one others may write."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.stat(folder)
    if info.st_uid != os.getuid():
        raise ConfigurationError(f"{folder} belongs to another user; refusing to serve there")
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise ConfigurationError(
            f"{folder} may be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"chmod 700 {folder}"
        )


# --- arguments --------------------------------------------------------------------------


class _Invalid(Exception):
    """A request the server refuses; the message goes back to the client."""


_REQUIRED = object()


def _an_id(what: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if isinstance(value, str) and len(value) <= 80:
            text = value.strip(" ")
            if text.startswith("<UID:") and text.endswith(">"):
                text = text[5:-1].strip(" ")
            text = text.lower()
            if _HEX_ID.fullmatch(text):
                return text
        raise _Invalid(f"{what} must be 32 hexadecimal digits (or <UID:...>)")

    return check


def _reason(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid("reason must be text")
    if len(value) > MAX_REASON_CHARS:
        raise _Invalid(f"reason is longer than {MAX_REASON_CHARS} characters")
    if not value.isprintable():
        raise _Invalid("reason holds control or invisible characters")
    return value


def _why(value: object) -> str:
    text = _reason(value)
    if not text.strip():
        raise _Invalid("reason must say why (the scientist reads it)")
    return text


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("all must be true or false")
    return value


def _last(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_AUDIT_LAST:
        raise _Invalid(f"last must be a whole number from 1 to {MAX_AUDIT_LAST}")
    return value


def _text_of(what: str, limit: int, *, empty: bool = True, multiline: bool = False):
    """A check for text of at most ``limit`` characters (one line unless ``multiline``)."""

    def check(value: object) -> str:
        if not isinstance(value, str) or len(value) > limit or (not empty and not value.strip()):
            least = "" if empty else "1 to "
            raise _Invalid(f"{what} must be text of {least}{limit} characters at most")
        plain = value.replace("\n", "").replace("\t", "") if multiline else value
        if not plain.isprintable():
            raise _Invalid(f"{what} holds control or invisible characters")
        return value

    return check


def _text_table(value: object) -> dict[str, list[Any]]:
    """A sample read from a CSV file: ``{"columns": [name], "rows": [[cell text]]}``."""
    if not isinstance(value, dict) or set(value) != {"columns", "rows"}:
        raise _Invalid("sample must be {columns, rows}")
    columns, rows = value["columns"], value["rows"]
    if not isinstance(columns, list) or not 1 <= len(columns) <= MAX_SCHEMA_ENTRIES:
        raise _Invalid(f"a sample has 1 to {MAX_SCHEMA_ENTRIES} columns")
    name = _text_of("a sample column", MAX_LISTING_NAME_CHARS, empty=False)
    checked_columns = [name(column) for column in columns]
    if len(set(checked_columns)) != len(checked_columns):
        raise _Invalid("a sample names a column twice")
    if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_SAMPLE_ROWS:
        raise _Invalid(f"a sample has 1 to {MAX_SAMPLE_ROWS} rows")
    cell = _text_of("a sample value", MAX_SAMPLE_TEXT_CHARS)
    checked_rows = []
    for row in rows:
        if not isinstance(row, list) or len(row) != len(columns):
            raise _Invalid("each sample row has one value per column")
        checked_rows.append([cell(item) for item in row])
    return {"columns": checked_columns, "rows": checked_rows}


def _optional(check: Callable[[object], object]) -> Callable[[object], object]:
    def maybe(value: object) -> object:
        return None if value is None else check(value)

    return maybe


def _keywords(value: object) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_KEYWORDS:
        raise _Invalid(f"keywords must be a list of at most {MAX_KEYWORDS} tags")
    check = _text_of("a keyword", MAX_KEYWORD_CHARS, empty=False)
    return [check(item) for item in value]


def _registry_url(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_URL_CHARS or not value.isprintable():
        raise _Invalid(f"registry must be an http(s) URL of at most {MAX_URL_CHARS} characters")
    if not value.startswith(("http://", "https://")):
        raise _Invalid("registry must be an http:// or https:// URL")
    return value


def _modality(value: object) -> str:
    if value not in MODALITIES:
        raise _Invalid(f"modality must be one of {', '.join(MODALITIES)}")
    return str(value)


def _time(value: object) -> float:
    if (
        isinstance(value, bool) or not isinstance(value, int | float)
        or not math.isfinite(value) or not 0 < value < MAX_TIME
    ):  # fmt: skip
        raise _Invalid("a time must be UTC epoch seconds")
    return float(value)


def _times(value: object) -> list[float]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PROPOSALS:
        raise _Invalid(f"times must be a list of 1 to {MAX_PROPOSALS} times")
    return [_time(item) for item in value]


@dataclass(frozen=True)
class _Param:
    name: str
    check: Callable[[object], object]
    default: object = _REQUIRED


_REQUEST_ID = _Param("request_id", _an_id("request_id"))
_CLIENT_ID = _Param("client_id", _an_id("client_id"))
_REASON = _Param("reason", _reason, "")
_JOB_ID = _Param("job_id", _an_id("job_id"))
_WHY = _Param("reason", _why)
"""Rejecting or withholding a job says why."""
_ALL = _Param("all", _flag, False)
_TAG = _Param("tag", _text_of("tag", MAX_TAG_CHARS, empty=False))
_REGISTRY = _Param("registry", _optional(_registry_url), None)
_PUBLISH = (
    _TAG,
    _Param("name", _text_of("name", MAX_LISTING_NAME_CHARS, empty=False)),
    _Param("summary", _text_of("summary", MAX_SUMMARY_CHARS), ""),
    _Param("description", _text_of("description", MAX_DESCRIPTION_CHARS, multiline=True), ""),
    _Param("license", _text_of("license", MAX_LICENSE_CHARS, empty=False)),
    _Param("keywords", _keywords, []),
    _REGISTRY,
    _Param("modality", _optional(_modality), None),
    _Param(
        "usage_conditions", _text_of("usage_conditions", MAX_LONG_TEXT_CHARS, multiline=True), ""
    ),
    _Param("citation", _optional(_text_of("citation", MAX_LONG_TEXT_CHARS, multiline=True)), None),
    _Param("sample", _optional(_text_table), None),
)
_SESSION_ID = _Param("request_id", _an_id("request_id"))
_MESSAGE = _Param("message", _text_of("message", MAX_MESSAGE_CHARS, multiline=True), "")
_COMMANDS: dict[str, tuple[str, tuple[_Param, ...]]] = {
    "status": ("control_status", ()),
    "requests": ("control_requests", (_ALL,)),
    "accept": ("control_accept", (_REQUEST_ID,)),
    "deny": ("control_deny", (_REQUEST_ID, _REASON)),
    "admissions": ("control_admissions", ()),
    "admit": ("control_admit", (_CLIENT_ID,)),
    "refuse": ("control_refuse", (_CLIENT_ID, _REASON)),
    "audit": ("control_audit", (_Param("last", _last, DEFAULT_AUDIT_LAST),)),
    "jobs": ("control_jobs", (_ALL,)),
    "job": ("control_job", (_JOB_ID,)),
    "approve": ("control_approve", (_JOB_ID,)),
    "reject": ("control_reject", (_JOB_ID, _WHY)),
    "release": ("control_release", (_JOB_ID,)),
    "withhold": ("control_withhold", (_JOB_ID, _WHY)),
    "cancel": ("control_cancel", (_JOB_ID,)),
    "publish": ("control_publish", _PUBLISH),
    "unpublish": ("control_unpublish", (_TAG, _REGISTRY)),
    "listings": ("control_listings", ()),
    "inbox": ("control_inbox", ()),
    "inbox_accept": (
        "control_inbox_accept",
        (_SESSION_ID, _Param("at", _optional(_time), None)),
    ),
    "inbox_decline": ("control_inbox_decline", (_SESSION_ID, _REASON)),
    "inbox_propose": (
        "control_inbox_propose",
        (_SESSION_ID, _Param("times", _times), _MESSAGE),
    ),
}
COMMANDS = frozenset(_COMMANDS)
"""The commands a control socket answers."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(line: bytes) -> tuple[str, str, list[object]]:
    """(command, HostControl method name, checked positional arguments) of one request
    line; raises _Invalid naming what is wrong."""
    try:
        message = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise _Invalid("the request is not a JSON object") from None
    if not isinstance(message, dict) or not set(message) <= {"command", "args"}:
        raise _Invalid('the request must be {"command": ..., "args": {...}}')
    command = message.get("command")
    if not isinstance(command, str) or command not in _COMMANDS:
        shown = repr(command[:40]) if isinstance(command, str) else "of that type"
        raise _Invalid(f"unknown command {shown}; known: {', '.join(sorted(_COMMANDS))}")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise _Invalid("args must be a JSON object")
    method, params = _COMMANDS[command]
    unknown = sorted(set(args) - {p.name for p in params})
    if unknown:
        raise _Invalid(f"{command} takes no argument {unknown[0][:40]!r}")
    values: list[object] = []
    for param in params:
        if param.name in args:
            values.append(param.check(args[param.name]))
        elif param.default is _REQUIRED:
            raise _Invalid(f"{command} needs {param.name}")
        else:
            values.append(param.default)
    return command, method, values


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _encode(response: dict[str, Any]) -> bytes:
    """One response line; an answer that is not plain JSON, or too large, becomes an error."""
    try:
        data = _JSON.encode(response).encode("ascii") + b"\n"
    except (TypeError, ValueError, RecursionError):
        logger.warning("a control answer was not plain JSON", exc_info=True)
        return _encode(_error("the host's answer is not plain JSON (see its log)"))
    if len(data) > MAX_RESPONSE_BYTES:
        return _encode(_error("the answer is larger than 64 MiB; ask for less (e.g. --last)"))
    return data


# --- server -----------------------------------------------------------------------------


class ControlServer:
    """Serves a HostControl on an AF_UNIX socket at ``path`` (see the module docstring)."""

    def __init__(self, path: Path, target: HostControl) -> None:
        self.path = Path(path)
        self._target = target
        self._server: asyncio.AbstractServer | None = None
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_COMMANDS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._inode: tuple[int, int] | None = None
        self._workers: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Listen; refuse if another host answers on the path; replace a stale socket."""
        if self._server is not None:
            raise RuntimeError("the control server is already running")
        if not hasattr(socket, "SO_PEERCRED"):
            raise ConfigurationError("the control socket needs SO_PEERCRED (Linux)")
        _prepare_parent(self.path.parent)
        await _clear_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            old_umask = os.umask(0o177)  # process-wide: held only around bind
            try:
                sock.bind(os.fspath(self.path))
            finally:
                os.umask(old_umask)
            bound = True
            info = os.lstat(self.path)
            self._inode = (info.st_dev, info.st_ino)
            os.chmod(self.path, 0o600)  # already 0600 through the umask; make sure
            self._workers = ThreadPoolExecutor(
                MAX_CONCURRENT_COMMANDS, thread_name_prefix="duet-control"
            )
            self._server = await asyncio.start_unix_server(
                self._handle, sock=sock, limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            sock.close()
            self._stop_workers()
            if bound:
                self._unlink()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigurationError(f"another host is serving from {self.path}") from None
            raise ConfigurationError(f"cannot listen on {self.path}: {exc}") from None
        except BaseException:
            sock.close()
            self._stop_workers()
            if bound:
                self._unlink()
            raise
        logger.debug("control socket listening on %s", self.path)

    async def close(self) -> None:
        """Stop accepting, let commands in flight finish (a few seconds), remove the file."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        pending = set(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=CLOSE_GRACE)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2.0)
        self._stop_workers()
        self._unlink()
        logger.debug("control socket %s closed", self.path)

    def _stop_workers(self) -> None:
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.shutdown(wait=False, cancel_futures=True)

    def _unlink(self) -> None:
        """Remove the socket file, unless another server has replaced it since."""
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # type: ignore[arg-type]
            task.add_done_callback(self._tasks.discard)
        try:
            if len(self._tasks) > MAX_CONNECTIONS:
                data = _encode(_error("the host is busy; try again"))
            else:
                data = await self._answer(reader, writer)
            writer.write(data)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            logger.debug("control connection dropped: %s", exc)
        except Exception:
            logger.warning("control connection failed", exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """The response line for one connection."""
        peer = _peer_credentials(writer.get_extra_info("socket"))
        if peer is None or peer[1] != os.getuid():
            logger.warning("control socket: refused a process of another user (%s)", peer)
            return _encode(_error("refused: this host answers its own user only"))
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), REQUEST_TIMEOUT)
        except TimeoutError:
            return _encode(_error(f"no request line within {REQUEST_TIMEOUT:g} s"))
        except asyncio.LimitOverrunError:
            return _encode(_error(f"the request is larger than {MAX_REQUEST_BYTES} bytes"))
        except asyncio.IncompleteReadError:
            return _encode(_error("the request line ended early"))
        try:
            command, method, values = parse_request(line)
        except _Invalid as exc:
            logger.debug("control socket: refused a request: %s", exc)
            return _encode(_error(str(exc)))
        logger.debug("control command %s from pid %d", command, peer[0])
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._workers, self._run, command, method, values)

    def _run(self, command: str, method: str, values: list[object]) -> bytes:
        """Run one command on this worker thread and encode its answer here too."""
        try:
            result = getattr(self._target, method)(*values)
        except DuetError as exc:
            return _encode(_error(str(exc) or type(exc).__name__))
        except Exception:
            logger.warning("control command %s failed", command, exc_info=True)
            return _encode(_error(f"the host failed to run {command} (see its log)"))
        return _encode({"ok": True, "result": result})


def _peer_credentials(sock: Any) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end, or None if unknown."""
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


async def _clear_stale(path: Path) -> None:
    """Remove a socket file nothing answers on; refuse a live one or a non-socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigurationError(f"{path} exists and is not a socket; refusing to replace it")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(os.fspath(path)), 2.0)
    except (ConnectionRefusedError, FileNotFoundError):
        logger.debug("removing stale control socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except TimeoutError:
        raise ConfigurationError(f"another host is serving from {path}") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot check {path}: {exc}") from None
    writer.close()
    raise ConfigurationError(f"another host is serving from {path}")


# --- client -----------------------------------------------------------------------------


def request(
    path: Path, command: str, args: dict[str, Any] | None = None, timeout: float = 30.0
) -> Any:
    """Send one command to the host serving at ``path`` and return its result; raise
    DuetError with the host's refusal, or saying that no host is serving there."""
    try:
        line = _JSON.encode({"command": command, "args": args or {}}).encode("ascii") + b"\n"
    except (TypeError, ValueError) as exc:
        raise DuetError(f"the command's arguments are not plain JSON: {exc}") from None
    if len(line) > MAX_REQUEST_BYTES:
        raise DuetError(f"the command is larger than {MAX_REQUEST_BYTES} bytes")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DuetError(f"no host is serving at {path} ({NOT_SERVING_HINT})") from None
        except TimeoutError:
            raise DuetError(f"the host at {path} did not accept within {timeout:g} s") from None
        except (OSError, ValueError) as exc:
            raise DuetError(f"cannot reach a host at {path}: {exc}") from None
        peer = _peer_credentials(sock)
        if peer is None or peer[1] != os.getuid():
            raise DuetError(f"{path} is served by another user's process; refusing to use it")
        try:
            sock.sendall(line)
            data = _read_line(sock, deadline)
        except TimeoutError:
            raise DuetError(f"the host at {path} did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise DuetError(f"the connection to the host at {path} failed: {exc}") from None
    return _decode(data)


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    buffer = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(1 << 16)
        if not chunk:
            return bytes(buffer)
        end = chunk.find(b"\n")
        buffer += chunk if end < 0 else chunk[:end]
        if len(buffer) > MAX_RESPONSE_BYTES:
            raise DuetError("the host's answer is larger than 64 MiB; refused")
        if end >= 0:
            return bytes(buffer)


def _decode(data: bytes) -> Any:
    if not data:
        raise DuetError("the host closed the connection without answering")
    try:
        message = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise DuetError("the host sent a malformed answer") from None
    if not isinstance(message, dict) or not isinstance(message.get("ok"), bool):
        raise DuetError("the host sent a malformed answer")
    if message["ok"]:
        if "result" not in message:
            raise DuetError("the host sent a malformed answer")
        return message["result"]
    error = message.get("error")
    if not isinstance(error, str):
        raise DuetError("the host sent a malformed answer")
    raise DuetError(printable(error, MAX_ERROR_CHARS) or "the host refused the command")
