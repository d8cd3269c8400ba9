"""host.toml: a standing host's settings, limits, datasets, handlers, budgets, jobs and
registry.

The file is read whole and checked before anything runs. Every error is a
ConfigurationError naming the file and the field (``host.toml: datasets[0].path: ...``;
arrays count from 0). Unknown keys, wrong types (a bool is not a number) and values out of
range are refused, so a typo never silently drops a rule. Relative paths resolve against the
directory of the file.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import re
import stat
import tomllib
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

from duet_p2p import paths
from duet_p2p.errors import ConfigurationError
from duet_p2p.limits import OwnerLimits
from duet_p2p.offline.policy import JobPolicy, job_policy_from_dict
from duet_p2p.permissions.policy import Handler

if TYPE_CHECKING:  # the job machinery imports torch; reading a host.toml must not
    from duet_p2p.host.jobs import JobSettings

MAX_CONFIG_BYTES = 1024**2
MAX_ENTRIES = 1000
MAX_HOURS = 24 * 366 * 10
MAX_TAGS = 64
MAX_TEXT_CHARS = 100
MAX_DESCRIPTION_CHARS = 4000
MAX_REASON_CHARS = 1000
FORMATS = ("npy", "safetensors", "csv", "parquet")
TENSOR_FORMATS = ("npy", "safetensors")
SUFFIXES = {".npy": "npy", ".safetensors": "safetensors", ".csv": "csv", ".parquet": "parquet"}
LOG_LEVELS = ("debug", "info", "warning", "error")
ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DATASET_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CLIENT_ID = re.compile(r"[0-9a-fA-F]{32}")
MAX_JOB_SECONDS = 1e9
MAX_POLL_SECONDS = 300
MAX_CONCURRENCY = 16
ON_RESTART = ("fail", "requeue")
"""As JobSettings checks them (duet_p2p.host.jobs)."""
_JOB_SETTINGS = ("enabled", "concurrency", "on_restart", "max_job_seconds", "mailbox",
                 "poll_seconds", "mailbox_max_result_mb")  # fmt: skip
MAX_MAILED_RESULT_MB = 1 << 20
REGISTRY_ENV = "DUET_REGISTRY_URL"
"""The registry a host publishes to when neither ``[registry] url`` nor ``registry_url=``
names one (as ``duet_p2p.registry.client.DEFAULT_REGISTRY_ENV``)."""
MAX_REGISTRY_URL_CHARS = 500
MIN_REGISTRY_SECONDS = 1.0
MAX_REGISTRY_SECONDS = 3600.0
_JOB_POLICY = ("approve_clients", "approve_plans", "approve_ops", "max_seconds", "release")
_ZERO_LIMITS = frozenset({"max_worker_restarts", "worker_memory_slack"})
"""OwnerLimits integers that may be 0; every other one must be at least 1."""
_REQUIRED = object()


@dataclass(frozen=True)
class HostSettings:
    """The ``[host]`` table."""

    signaling_url: str
    name: str = "host"
    admit: str | tuple[str, ...] = "ask"
    """``"ask"``, ``"any"`` or the Client IDs admitted without asking."""
    data_dir: Path | None = None
    keep_released_seconds: float = 168 * 3600.0
    request_expiry_seconds: float | None = None
    """None: pending requests never expire."""
    min_aggregation: float = 1.0
    max_scientists: int = 16
    max_pending_admissions: int = 32
    log_level: str = "info"
    host_addresses: tuple[str, ...] | None = None
    ice_servers: tuple[dict[str, Any], ...] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """One ``[[datasets]]`` entry; ``where`` names it in error messages."""

    name: str
    path: Path
    format: str
    tensor: str | None = None
    tags: tuple[str, ...] = ()
    description: str = ""
    public: bool = False
    searchable: bool = True
    show_metadata: bool = False
    columns: tuple[str, ...] | None = None
    identifier: str | None = None
    rows_per_identifier: int = 1
    where: str = "datasets"


@dataclass(frozen=True)
class HandlerSpec:
    """One ``[[handlers]]`` entry: ``RequestQueue.add_handler(action, name=name, **criteria)``."""

    name: str
    action: str
    criteria: dict[str, Any] = field(default_factory=dict)

    def add_to(self, queue: Any) -> Handler:
        """Append this rule to ``queue`` (a RequestQueue) and return its Handler."""
        return queue.add_handler(self.action, name=self.name, **dict(self.criteria))


@dataclass(frozen=True)
class BudgetSpec:
    """One ``[[budgets]]`` entry: ``set_total_budget`` when ``total``, else ``set_budget``."""

    dataset: str
    epsilon: float
    delta: float = 0.0
    client_id: str | None = None
    total: bool = False


@dataclass(frozen=True)
class JobOptions:
    """The ``[jobs]`` table, checked: JobSettings' fields (``HostConfig.jobs``)."""

    enabled: bool = True
    policy: JobPolicy = field(default_factory=JobPolicy)
    concurrency: int = 1
    on_restart: str = "fail"
    max_job_seconds: float | None = None
    mailbox: bool = True
    poll_seconds: float = 20.0
    mailbox_max_result_bytes: int = 48 << 20


@dataclass(frozen=True)
class RegistryOptions:
    """The ``[registry]`` table: where the host publishes listings, and how often it tells
    the registry it is online (a signed heartbeat) and reads its inbox of session
    requests. ``url`` None: ``$DUET_REGISTRY_URL`` when set (read when publishing)."""

    url: str | None = None
    heartbeat_seconds: float = 120.0
    inbox_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.url is not None:
            try:
                object.__setattr__(self, "url", registry_url(self.url))
            except ValueError as exc:
                raise ConfigurationError(f"url {exc}") from None
        for name in ("heartbeat_seconds", "inbox_seconds"):
            value = getattr(self, name)
            if (
                isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or not 0 < value <= MAX_REGISTRY_SECONDS
            ):  # fmt: skip
                raise ConfigurationError(
                    f"{name} must be a number of seconds above 0, at most {MAX_REGISTRY_SECONDS:g}"
                )
            object.__setattr__(self, name, float(value))

    def resolved_url(self, given: str | None = None) -> str:
        """``given``, else ``url``, else ``$DUET_REGISTRY_URL``: checked, without a trailing
        slash; ConfigurationError when none names a registry or the one named is no URL."""
        for where, value in (("registry_url", given), ("[registry] url", self.url),
                             (f"${REGISTRY_ENV}", os.environ.get(REGISTRY_ENV) or None)):  # fmt: skip
            if value is None:
                continue
            try:
                return registry_url(value)
            except ValueError as exc:
                raise ConfigurationError(f"{where} {exc}") from None
        raise ConfigurationError(
            f"no registry: pass registry_url=, set url under [registry] in host.toml, or set "
            f"${REGISTRY_ENV}"
        )


def registry_url(value: object) -> str:
    """A registry's base URL, checked (http(s), a host, no credentials, query or fragment;
    a path is kept: a registry may be mounted under one), without a trailing slash."""
    if isinstance(value, str) and len(value) > MAX_REGISTRY_URL_CHARS:
        raise ValueError(f"is longer than {MAX_REGISTRY_URL_CHARS} characters")
    url = _url(value)
    if not url.isascii():
        raise ValueError(f"must be plain ASCII: {_short(value)}")
    return url


@dataclass(frozen=True)
class HostConfig:
    """A whole host.toml, checked."""

    settings: HostSettings
    limits: OwnerLimits
    datasets: tuple[DatasetSpec, ...]
    handlers: tuple[HandlerSpec, ...]
    budgets: tuple[BudgetSpec, ...]
    source: Path
    job_options: JobOptions = field(default_factory=JobOptions)
    """The ``[jobs]`` table, checked; ``jobs`` makes it JobSettings."""
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    """The ``[registry]`` table: where ``duet-host publish`` lists datasets and models."""

    @cached_property
    def jobs(self) -> JobSettings:
        """The ``[jobs]`` table: offline jobs, and what is decided without the owner."""
        from duet_p2p.host.jobs import JobSettings

        try:
            options = self.job_options
            return JobSettings(**{f.name: getattr(options, f.name) for f in fields(options)})
        except ConfigurationError as exc:
            raise ConfigurationError(f"{self.source}: jobs: {exc}") from None

    @property
    def host_dir(self) -> Path:
        """Where this host keeps its state (not created here)."""
        base = self.settings.data_dir or paths.data_dir()
        return base / "hosts" / self.settings.name


def load_config(path: str | Path) -> HostConfig:
    """Read and check a host.toml (a regular file of at most 1 MiB)."""
    source = Path(path)
    label = str(source)
    try:
        handle = open_regular(source)
    except FileNotFoundError:
        raise ConfigurationError(f"{label}: no such file") from None
    except OSError as exc:
        raise ConfigurationError(f"{label}: cannot open: {exc.strerror or exc}") from None
    with handle:
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigurationError(f"{label}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigurationError(f"{label}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{label}: invalid TOML: {exc}") from None
    return parse_config(data, source)


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, once, and checked through its descriptor to be a regular
    file (a FIFO does not block the open; a file swapped after a check cannot slip in).
    Raises OSError, e.g. ``IsADirectoryError`` or ``OSError(ENODEV)`` for other kinds."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = errno.EISDIR if stat.S_ISDIR(mode) else errno.ENODEV
            raise OSError(kind, "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def parse_config(data: dict[str, Any], source: Path) -> HostConfig:
    """Check parsed TOML (``source`` names the file and anchors relative paths)."""
    top = _Table(
        str(source), "", data,
        ("host", "limits", "datasets", "handlers", "budgets", "jobs", "registry"),
    )  # fmt: skip
    base = source.expanduser().absolute().parent
    settings = _settings(top.table("host"), base)
    limits = _limits(top.table("limits"))
    datasets = tuple(_dataset(t, base) for t in top.array("datasets"))
    _unique(top, "datasets", [d.name for d in datasets], "dataset name")
    known_tags = {tag for d in datasets for tag in (d.name, *d.tags)}
    handlers = tuple(_handler(t, known_tags) for t in top.array("handlers"))
    _unique(top, "handlers", [h.name for h in handlers], "handler name")
    budgets = tuple(_budget(t, known_tags) for t in top.array("budgets"))
    scopes = [f"{b.dataset} {'total' if b.total else b.client_id or 'each'}" for b in budgets]
    _unique(top, "budgets", scopes, "budget (same dataset and scope)", key="dataset")
    jobs = _jobs(top.table("jobs"), known_tags)
    registry = _registry(top.table("registry"))
    source = source.expanduser().absolute()
    return HostConfig(settings, limits, datasets, handlers, budgets, source, job_options=jobs,
                      registry=registry)  # fmt: skip


# -- sections ------------------------------------------------------------------------------


def _settings(t: _Table, base: Path) -> HostSettings:
    t.allow(
        "name", "signaling_url", "admit", "data_dir", "keep_released_hours",
        "request_expiry_hours", "min_aggregation", "max_scientists", "max_pending_admissions",
        "log_level", "host_addresses", "ice_servers",
    )  # fmt: skip
    data_dir = t.string("data_dir", None, max_chars=4096)
    keep = t.number("keep_released_hours", 168, low=0, high=MAX_HOURS, above=True)
    expiry = t.number("request_expiry_hours", 0, low=0, high=MAX_HOURS)
    return HostSettings(
        name=t.string("name", "host", pattern=_HOST_NAME, hint="1 to 64 of A-Z a-z 0-9 _ -"),
        signaling_url=t.check("signaling_url", _REQUIRED, _url),
        admit=t.check("admit", "ask", _admit),
        data_dir=None if data_dir is None else _resolve(base, data_dir),
        keep_released_seconds=3600.0 * keep,
        request_expiry_seconds=3600.0 * expiry if expiry else None,
        min_aggregation=float(t.number("min_aggregation", 1, low=1)),
        max_scientists=t.integer("max_scientists", 16, low=1, high=1000),
        max_pending_admissions=t.integer("max_pending_admissions", 32, low=1, high=10_000),
        log_level=t.choice("log_level", "info", LOG_LEVELS),
        host_addresses=t.check("host_addresses", None, _addresses),
        ice_servers=t.check("ice_servers", None, _ice_servers),
    )


def _limits(t: _Table) -> OwnerLimits:
    hints = typing.get_type_hints(OwnerLimits)
    names = [f.name for f in fields(OwnerLimits)]
    t.allow(*names)
    values: dict[str, Any] = {}
    for name in names:
        if name not in t.data:
            continue
        kinds = {k for k in typing.get_args(hints[name]) or (hints[name],) if k is not type(None)}
        if kinds == {bool}:
            values[name] = t.boolean(name, False)
        elif kinds == {int}:
            values[name] = t.integer(name, 0, low=0 if name in _ZERO_LIMITS else 1)
        elif kinds == {float}:
            values[name] = float(t.number(name, 0, low=0, above=True))
        elif kinds == {str}:
            values[name] = t.string(name, "")
        else:
            t.fail(name, "cannot be set from a config file")
    try:
        return OwnerLimits(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{t.file}: limits: {exc}") from None


def _dataset(t: _Table, base: Path) -> DatasetSpec:
    t.allow(
        "name", "path", "format", "tensor", "tags", "description", "public", "searchable",
        "show_metadata", "columns", "identifier", "rows_per_identifier",
    )  # fmt: skip
    name = t.string("name", _REQUIRED, pattern=_DATASET_NAME, hint="1 to 64 of A-Z a-z 0-9 _ . -")
    path = _resolve(base, t.string("path", _REQUIRED, max_chars=4096))
    if not path.exists():
        t.fail("path", f"no such file: {path}")
    if not path.is_file():
        t.fail("path", f"not a regular file: {path}")
    suffix = SUFFIXES.get(path.suffix.lower())
    if suffix is None and "format" not in t.data:
        t.fail("path", f"cannot tell the format from {path.name!r}: set format ({_or(FORMATS)})")
    fmt = t.choice("format", suffix, FORMATS)
    tensor = t.string("tensor", None)
    if tensor is not None and fmt != "safetensors":
        t.fail("tensor", "applies to safetensors files only")
    columns = t.texts("columns", None, max_items=10_000, unique=True)
    if columns is not None and fmt not in TENSOR_FORMATS:
        t.fail("columns", "a table (csv, parquet) brings its own columns: leave out columns")
    identifier = t.string("identifier", None)
    if identifier is not None and fmt in TENSOR_FORMATS:
        if columns is None:
            t.fail("identifier", "needs columns to name it")
        if identifier not in columns:
            t.fail("identifier", f"{identifier!r} is not one of columns")
    tags = tuple(dict.fromkeys(tag for tag in t.texts("tags", ()) if tag != name))
    if len(tags) + 1 > MAX_TAGS:
        t.fail("tags", f"at most {MAX_TAGS} tags, the name included")
    return DatasetSpec(
        name=name,
        path=path,
        format=fmt,
        tensor=tensor,
        tags=tags,
        description=t.string("description", "", max_chars=MAX_DESCRIPTION_CHARS, multiline=True),
        public=t.boolean("public", False),
        searchable=t.boolean("searchable", True),
        show_metadata=t.boolean("show_metadata", False),
        columns=columns,
        identifier=identifier,
        rows_per_identifier=t.integer("rows_per_identifier", 1, low=1, high=10_000),
        where=f"{t.file}: {t.path}",
    )


_ACCEPT_ONLY = ("min_aggregation", "ignore_disclosure_checks", "print_local", "log_local")


def _handler(t: _Table, known_tags: Collection[str]) -> HandlerSpec:
    t.allow(
        "name", "action", "tags", "op", "max_elements", "max_requests", "timeout_secs", "reason",
        "min_aggregation", "dp", "max_epsilon", "max_delta", "ignore_disclosure_checks",
        "print_local", "log_local",
    )  # fmt: skip
    name = t.string("name", _REQUIRED)
    action = t.choice("action", _REQUIRED, ("accept", "deny"))
    present = set(t.data)
    for key in _ACCEPT_ONLY if action == "deny" else ("reason",):
        if key in present:
            t.fail(key, f"applies to {'deny' if key == 'reason' else 'accept'} handlers only")
    readers: dict[str, Callable[[str], Any]] = {
        "tags": lambda k: t.texts(k, None, max_items=MAX_TAGS, unique=True),
        "op": lambda k: t.string(k, None, max_chars=200),
        "max_elements": lambda k: t.integer(k, None, low=0),
        "max_requests": lambda k: t.integer(k, None, low=0),
        "timeout_secs": lambda k: float(t.number(k, 0, low=0)),
        "reason": lambda k: t.string(k, "", max_chars=MAX_REASON_CHARS),
        "min_aggregation": lambda k: float(t.number(k, 1, low=1)),
        "dp": lambda k: t.boolean(k, False),
        "max_epsilon": lambda k: float(t.number(k, 0, low=0)),
        "max_delta": lambda k: float(t.number(k, 0, low=0, high=1)),
        "ignore_disclosure_checks": lambda k: t.boolean(k, False),
        "print_local": lambda k: t.boolean(k, False),
        "log_local": lambda k: t.boolean(k, False),
    }
    criteria = {key: read(key) for key, read in readers.items() if key in present}
    for tag in criteria.get("tags", ()):
        if tag not in known_tags:
            t.fail("tags", f"{tag!r} is neither the name nor a tag of any dataset")
    try:
        Handler(action=action, name=name, **criteria)
    except (TypeError, ValueError) as exc:
        t.fail(None, str(exc))
    return HandlerSpec(name, action, criteria)


def _budget(t: _Table, known_tags: Collection[str]) -> BudgetSpec:
    t.allow("dataset", "epsilon", "delta", "client_id", "total")
    dataset = t.string("dataset", _REQUIRED)
    if dataset not in known_tags:
        t.fail("dataset", f"{dataset!r} is neither the name nor a tag of any dataset")
    client_id = t.check("client_id", None, _client_id)
    total = t.boolean("total", False)
    if total and client_id is not None:
        t.fail("client_id", "cannot go with total = true (a total budget is shared by all)")
    return BudgetSpec(
        dataset=dataset,
        epsilon=float(t.number("epsilon", _REQUIRED, low=0, above=True)),
        delta=float(t.number("delta", 0, low=0, high=1, below=True)),
        client_id=client_id,
        total=total,
    )


def _jobs(t: _Table, known_tags: Collection[str]) -> JobOptions:
    t.allow(*_JOB_SETTINGS, *_JOB_POLICY)
    seconds = t.number("max_job_seconds", None, low=0, high=MAX_JOB_SECONDS, above=True,
                       below=True)  # fmt: skip
    try:
        policy = job_policy_from_dict({k: v for k, v in t.data.items() if k in _JOB_POLICY},
                                      where=t.path)  # fmt: skip
    except ConfigurationError as exc:  # "jobs.field: message"
        raise ConfigurationError(f"{t.file}: {exc}") from None
    for index, rule in enumerate(policy.release):
        for tag in sorted(rule.tags or ()):
            if tag not in known_tags:
                t.fail(f"release[{index}].tags",
                       f"{_short(tag)} is neither the name nor a tag of any dataset")  # fmt: skip
    return JobOptions(
        enabled=t.boolean("enabled", True),
        policy=policy,
        concurrency=t.integer("concurrency", 1, low=1, high=MAX_CONCURRENCY),
        on_restart=t.choice("on_restart", "fail", ON_RESTART),
        max_job_seconds=None if seconds is None else float(seconds),
        mailbox=t.boolean("mailbox", True),
        poll_seconds=float(
            t.number("poll_seconds", 20.0, low=0, high=MAX_POLL_SECONDS, above=True)
        ),  # fmt: skip
        mailbox_max_result_bytes=int(
            t.number("mailbox_max_result_mb", 48, low=0, high=MAX_MAILED_RESULT_MB, above=True)
            * (1 << 20)
        ),
    )


def _registry(t: _Table) -> RegistryOptions:
    t.allow("url", "heartbeat_seconds", "inbox_seconds")
    low, high = MIN_REGISTRY_SECONDS, MAX_REGISTRY_SECONDS
    return RegistryOptions(
        url=t.check("url", None, registry_url),
        heartbeat_seconds=float(t.number("heartbeat_seconds", 120.0, low=low, high=high)),
        inbox_seconds=float(t.number("inbox_seconds", 60.0, low=low, high=high)),
    )


# -- values --------------------------------------------------------------------------------


def _url(value: object) -> str:
    if not isinstance(value, str) or not value.isprintable() or len(value) > 2048:
        raise ValueError("must be an http:// or https:// URL")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"is not a valid URL: {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in value:
        raise ValueError(f"must be http(s)://host[:port], not {value!r}")
    if parts.username is not None or parts.query or parts.fragment or port == 0:
        raise ValueError(f"must be http(s)://host[:port] (no credentials, query or port 0): "
                         f"{value!r}")  # fmt: skip
    return value.rstrip("/")


def _client_id(value: object) -> str:
    if not isinstance(value, str) or not _CLIENT_ID.fullmatch(value):
        raise ValueError(f"{_short(value)} is not a Client ID (32 hexadecimal digits)")
    return value.lower()


def _admit(value: object) -> str | tuple[str, ...]:
    message = 'must be "ask", "any" or a list of Client IDs'
    if value in ("ask", "any"):
        return str(value)
    if not isinstance(value, list) or not value or len(value) > 10_000:
        raise ValueError(message)
    ids: list[str] = []
    for index, item in enumerate(value):
        try:
            ids.append(_client_id(item))
        except ValueError as exc:
            raise ValueError(f"{message}: item {index}: {exc}") from None
    return tuple(dict.fromkeys(ids))


def _addresses(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or len(value) > 64:
        raise ValueError("must be a list of 1 to 64 IP addresses")
    result = []
    for item in value:
        try:
            result.append(str(ipaddress.ip_address(item if isinstance(item, str) else "")))
        except ValueError:
            raise ValueError(f"{_short(item)} is not an IP address") from None
    return tuple(result)


def _ice_servers(value: object) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value or len(value) > 32:
        raise ValueError("must be a list of 1 to 32 tables { urls, username, credential }")
    servers = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"item {index} must be a table {{ urls, username, credential }}")
        unknown = sorted(set(item) - {"urls", "username", "credential"})
        if unknown:
            raise ValueError(f"item {index}: unknown key {unknown[0]!r}")
        urls = item.get("urls")
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not urls or not all(_ice_url(u) for u in urls):
            raise ValueError(f"item {index}: urls must be stun:, stuns:, turn: or turns: URLs")
        server: dict[str, Any] = {"urls": list(urls)}
        for key in ("username", "credential"):
            text = item.get(key)
            if text is not None and (not isinstance(text, str) or len(text) > 1000):
                raise ValueError(f"item {index}: {key} must be a string")
            if text is not None:
                server[key] = text
        if ("username" in server) != ("credential" in server):
            raise ValueError(f"item {index}: username and credential go together")
        servers.append(server)
    return tuple(servers)


def _ice_url(url: object) -> bool:
    return (
        isinstance(url, str) and url.isprintable() and " " not in url and len(url) <= 2048
        and url.startswith(ICE_SCHEMES) and len(url) > url.index(":") + 1
    )  # fmt: skip


def _resolve(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def _unique(top: _Table, array: str, values: list[str], what: str, key: str = "name") -> None:
    seen: dict[str, int] = {}
    for index, value in enumerate(values):
        if value in seen:
            top.fail(f"{array}[{index}].{key}", f"duplicate {what} (also {array}[{seen[value]}])")
        seen[value] = index


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _or(options: Collection[str]) -> str:
    quoted = [f'"{o}"' for o in options]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


# -- reading one table ---------------------------------------------------------------------


class _Table:
    """One TOML table, read field by field; every error names ``file: path.field``."""

    def __init__(self, file: str, path: str, data: object, known: Collection[str] = ()) -> None:
        self.file, self.path = file, path
        if not isinstance(data, dict):
            raise ConfigurationError(f"{file}: {path or '(top level)'}: must be a table")
        self.data: dict[str, Any] = data
        if known:
            self.allow(*known)

    def where(self, key: str | None) -> str:
        if key is None:
            return self.path
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str | None, message: str) -> typing.NoReturn:
        raise ConfigurationError(f"{self.file}: {self.where(key)}: {message}")

    def allow(self, *known: str) -> None:
        for key in self.data:
            if key not in known:
                self.fail(key, f"unknown key; expected one of: {', '.join(known)}")

    def table(self, key: str) -> _Table:
        return _Table(self.file, self.where(key), self.data.get(key, {}))

    def array(self, key: str) -> list[_Table]:
        items = self.data.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            self.fail(key, f"must be an array of tables ([[{key}]])")
        if len(items) > MAX_ENTRIES:
            self.fail(key, f"at most {MAX_ENTRIES} entries")
        return [_Table(self.file, f"{self.where(key)}[{i}]", item) for i, item in enumerate(items)]

    def _get(self, key: str, default: Any) -> Any:
        if key not in self.data:
            if default is _REQUIRED:
                self.fail(key, "required")
            return default
        return self.data[key]

    def check(self, key: str, default: Any, convert: Callable[[object], Any]) -> Any:
        if key not in self.data:
            return self._get(key, default)
        try:
            return convert(self.data[key])
        except ValueError as exc:
            self.fail(key, str(exc))

    def string(
        self,
        key: str,
        default: Any,
        *,
        pattern: re.Pattern[str] | None = None,
        hint: str = "",
        max_chars: int = MAX_TEXT_CHARS,
        multiline: bool = False,
    ) -> Any:
        value = self._get(key, default)
        if key not in self.data:
            return value
        if not isinstance(value, str):
            self.fail(key, f"must be a string, not {_kind(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(key, f"{_short(value)} is not valid: {hint}")
        if not value and default is _REQUIRED:
            self.fail(key, "must not be empty")
        if len(value) > max_chars:
            self.fail(key, f"longer than {max_chars} characters")
        text = value.replace("\n", "").replace("\t", "") if multiline else value
        if not text.isprintable():
            self.fail(key, "has control or invisible characters")
        return value

    def texts(self, key: str, default: Any, *, max_items: int = MAX_TAGS, unique: bool = False):
        value = self._get(key, default)
        if key not in self.data:
            return value
        if not isinstance(value, list) or not value or len(value) > max_items:
            self.fail(key, f"must be a list of 1 to {max_items} strings")
        for index, item in enumerate(value):
            ok = isinstance(item, str) and 0 < len(item) <= MAX_TEXT_CHARS and item.isprintable()
            if not ok:
                self.fail(f"{key}[{index}]", f"must be a printable string of 1 to "
                          f"{MAX_TEXT_CHARS} characters, not {_short(item)}")  # fmt: skip
        if unique and len(set(value)) != len(value):
            self.fail(key, "has duplicates")
        return tuple(value)

    def choice(self, key: str, default: Any, options: Collection[str]) -> Any:
        value = self._get(key, default)
        if key in self.data and value not in options:
            self.fail(key, f"must be {_or(options)}, not {_short(value)}")
        return value

    def boolean(self, key: str, default: Any) -> Any:
        value = self._get(key, default)
        if key in self.data and not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {_kind(value)}")
        return value

    def integer(self, key: str, default: Any, *, low: int, high: int | None = None) -> Any:
        value = self._get(key, default)
        if key not in self.data:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, not {_kind(value)}")
        if value < low or (high is not None and value > high):
            self.fail(key, f"must be {_range(low, high, False, False)}, not {value}")
        return value

    def number(
        self,
        key: str,
        default: Any,
        *,
        low: float,
        high: float | None = None,
        above: bool = False,
        below: bool = False,
    ) -> Any:
        value = self._get(key, default)
        if key not in self.data:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"must be a number, not {_kind(value)}")
        ok = math.isfinite(value) and (value > low if above else value >= low)
        if high is not None:
            ok = ok and (value < high if below else value <= high)
        if not ok:
            self.fail(key, f"must be {_range(low, high, above, below)}, not {value}")
        return value


def _range(low: float, high: float | None, above: bool, below: bool) -> str:
    start = f"> {low:g}" if above else f">= {low:g}"
    if high is None:
        return start
    return f"{start} and {'<' if below else '<='} {high:g}"


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}  # fmt: skip
    return names.get(type(value), type(value).__name__)
