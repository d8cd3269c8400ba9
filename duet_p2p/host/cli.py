"""The ``duet-host`` command: run a standing host, and administer it while it serves."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from duet_p2p.errors import ConfigurationError, DuetError
from duet_p2p.host.control import DEFAULT_AUDIT_LAST, MAX_AUDIT_LAST, request, socket_path
from duet_p2p.registry.sample import MAX_ROWS as MAX_SAMPLE_ROWS
from duet_p2p.table import Table, format_clock, format_size, uid_label
from duet_p2p.text import printable

if TYPE_CHECKING:
    from duet_p2p.host.config import HostConfig

CONFIG_ENV = "DUET_HOST_CONFIG"
PROG = "duet-host"
_RAW = argparse.RawDescriptionHelpFormatter

DESCRIPTION = """\
Run a standing host, and administer it while it serves.

A standing host is an owner that stays up: one long-running process with a persistent
identity (its Host ID never changes), hosting the datasets listed in host.toml and serving
many scientists over days. Handlers in host.toml decide routine requests; the rest wait for
you. Scientists may also submit offline jobs, which run later: you review their code before
they run and their outputs before they are released (or a [jobs] policy does). From
another terminal you list and decide requests and jobs, admit or refuse new scientists, and
read the audit log. Those commands talk to the running host through a socket in its host
directory that only your user can open."""

EPILOG = """\
example:
  duet-host init host.toml             # write a config; edit signaling_url and [[datasets]]
  duet-host serve --config host.toml   # terminal 1: serve until Ctrl-C
  duet-host requests                   # terminal 2: what scientists ask to take away
  duet-host accept 0123456789abcdef0123456789abcdef
  duet-host deny 0123456789abcdef0123456789abcdef --reason "too fine-grained"
  duet-host jobs                       # offline jobs; then job / approve / reject /
                                       # release / withhold JOB
  duet-host publish ages --name "Made-up patients" --license CC-BY-4.0 --tag health
                                       # list a dataset on the OpenGrid registry
  duet-host inbox                      # session requests scientists sent through it

Every command finds the host through --config (default ./host.toml, or $DUET_HOST_CONFIG),
or through --socket PATH. IDs may be typed as listed, quoted: '<UID:...>'.
Run `duet-host COMMAND --help` for each command's options."""

TEMPLATE = """\
# A standing host: run it with `duet-host serve --config host.toml`.
# Relative paths are relative to this file. Every key is checked: a typo is an error.

[host]
name = "host"                            # identity and host directory name
signaling_url = "http://127.0.0.1:8765"  # the signaling server your scientists use too
admit = "ask"                            # "ask": you admit each new scientist
                                         # (duet-host admissions / admit / refuse);
                                         # "any"; or a list of Client IDs
# data_dir = "/var/lib/duet"            # default: $DUET_HOME or the per-user data directory
# max_scientists = 16                   # sessions at once
# log_level = "info"

# Each dataset is hosted under its name (its first tag), which scientists search for.
# [[datasets]]
# name = "ages"
# path = "ages.csv"                     # npy, safetensors, csv or parquet
# description = "Ages of made-up patients"

# Handlers decide matching requests without you, in order; the rest wait for
# `duet-host requests` / `accept` / `deny`.
# [[handlers]]
# name = "small sums"
# action = "accept"
# tags = ["ages"]
# op = "sum"
# max_elements = 10

# A differential privacy budget per scientist for a dataset.
# [[budgets]]
# dataset = "ages"
# epsilon = 1.0

# Offline jobs: scientists submit them now, they run later. Each waits for you to review
# its code (`duet-host jobs` / `job` / `approve` / `reject`) and its outputs (`release` /
# `withhold`), unless a rule below decides.
# [jobs]
# enabled = true
# concurrency = 1                       # jobs run at once
# max_job_seconds = 3600                # refuse jobs asking for longer
# approve_clients = ["0123456789abcdef0123456789abcdef"]   # their code runs unreviewed
# [[jobs.release]]                      # release these outputs without asking
# outputs = ["accuracy"]
# max_elements = 1
"""

_TEXT_CHARS = 200
_ROW_KEYS_SHOWN = 12


# --- the parser -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=os.environ.get(CONFIG_ENV) or "host.toml",
        help=f"the host's config file (default ./host.toml, or ${CONFIG_ENV})",
    )
    control = argparse.ArgumentParser(add_help=False, parents=[common])
    control.add_argument(
        "--socket",
        metavar="PATH",
        help="the running host's control socket, instead of finding it through --config",
    )
    control.add_argument("--json", action="store_true", help="print JSON instead of text")

    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=_RAW
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str,
        run: Callable[[argparse.Namespace], int],
        summary: str,
        example: str,
        *,
        parent: argparse.ArgumentParser = control,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            parents=[parent],
            help=summary,
            description=summary,
            epilog="example:\n" + "\n".join(f"  {line}" for line in example.splitlines()),
            formatter_class=_RAW,
        )
        p.set_defaults(run=run)
        return p

    p = command(
        "init",
        _init,
        "Write an example host.toml to edit (an existing file is never overwritten).",
        "duet-host init host.toml\n$EDITOR host.toml\nduet-host serve --config host.toml",
        parent=common,
    )
    p.add_argument("path", nargs="?", metavar="PATH", help="where to write it (default --config)")
    command(
        "serve",
        _serve,
        "Serve the datasets in the config until interrupted (Ctrl-C or SIGTERM).",
        "duet-host serve --config host.toml",
        parent=common,
    )
    p = command(
        "id",
        _id,
        "Print this host's ID (what scientists join with) without serving; --json adds its "
        "public key (what a scientist who never connected passes as host_key= to submit a "
        "job through the mailbox).",
        "duet-host id --config host.toml\nduet-host id --config host.toml --json",
        parent=common,
    )
    p.add_argument("--json", action="store_true", help="print the ID and public key as JSON")
    command("status", _status, "Show the running host's state.", "duet-host status")
    p = command(
        "requests",
        _requests,
        "List requests waiting for your decision (--all: decided ones too).",
        "duet-host requests\nduet-host requests --all --json",
    )
    p.add_argument("--all", action="store_true", help="also list decided requests")
    p = command(
        "accept",
        _accept,
        "Accept a request: its value is released to the scientist who asked.",
        "duet-host accept 0123456789abcdef0123456789abcdef\nduet-host accept '<UID:0123456789abcdef0123456789abcdef>'",
    )
    p.add_argument("request_id", metavar="ID", help="the request's ID (as listed by requests)")
    p = command(
        "deny",
        _deny,
        "Deny a request; the scientist sees your reason.",
        'duet-host deny 0123456789abcdef0123456789abcdef --reason "too fine-grained"',
    )
    p.add_argument("request_id", metavar="ID", help="the request's ID (as listed by requests)")
    p.add_argument("--reason", default="", metavar="TEXT", help="why, shown to the scientist")
    command(
        "admissions",
        _admissions,
        "List scientists waiting to be admitted, and those admitted or refused.",
        "duet-host admissions",
    )
    p = command(
        "admit",
        _admit,
        "Admit a scientist: their Client ID may connect from now on.",
        "duet-host admit 0123456789abcdef0123456789abcdef",
    )
    p.add_argument("client_id", metavar="CLIENT_ID", help="the scientist's Client ID")
    p = command(
        "refuse",
        _refuse,
        "Refuse a scientist: their Client ID is turned away from now on.",
        'duet-host refuse 0123456789abcdef0123456789abcdef --reason "unknown to us"',
    )
    p.add_argument("client_id", metavar="CLIENT_ID", help="the scientist's Client ID")
    p.add_argument("--reason", default="", metavar="TEXT", help="why, shown to the scientist")
    p = command(
        "audit",
        _audit,
        "Show the last entries of the host's audit log.",
        "duet-host audit --last 100",
    )
    p.add_argument(
        "--last",
        type=int,
        default=DEFAULT_AUDIT_LAST,
        metavar="N",
        help=f"how many entries, 1 to {MAX_AUDIT_LAST} (default %(default)s)",
    )
    _job_commands(command)
    _registry_commands(command)
    return parser


_JOB = "0123456789abcdef0123456789abcdef"


def _job_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """``jobs``, ``job`` and the owner's decisions on a job."""
    p = command(
        "jobs",
        _jobs,
        "List open offline jobs, newest first (--all: finished ones too).",
        "duet-host jobs\nduet-host jobs --all --json",
    )
    p.add_argument("--all", action="store_true", help="also list finished jobs")
    decisions = [
        ("job", _job, "Show a job: its code review, its outputs and its trail.",
         f"duet-host job {_JOB}", False),
        ("approve", _decision, "Approve a job's code: it is queued to run.",
         f"duet-host job {_JOB}        # read its code review first\n"
         f"duet-host approve {_JOB}", False),
        ("reject", _decision, "Reject a job's code; the scientist sees your reason.",
         f'duet-host reject {_JOB} --reason "uses the raw labels"', True),
        ("release", _decision,
         "Release a finished job's outputs to its scientist (with a receipt).",
         f"duet-host job {_JOB}        # read its outputs first\n"
         f"duet-host release {_JOB}", False),
        ("withhold", _decision, "Withhold a finished job's outputs; the scientist sees your "
         "reason.", f'duet-host withhold {_JOB} --reason "the model memorises rows"', True),
        ("cancel", _decision, "Cancel a job before or while it runs (a running job's worker "
         "session is closed).", f"duet-host cancel {_JOB}", False),
    ]  # fmt: skip
    for name, run, summary, example, reason in decisions:
        p = command(name, run, summary, example)
        p.add_argument("job_id", metavar="JOB", help="the job's ID (as listed by jobs)")
        if reason:
            p.add_argument("--reason", required=True, metavar="TEXT",
                           help="why, shown to the scientist")  # fmt: skip


_REGISTRY_HELP = ("the registry's URL (default: url under [registry] in host.toml, or "
                  "$DUET_REGISTRY_URL)")  # fmt: skip


def _registry_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """``publish``, ``unpublish``, ``listings`` and ``inbox``: the host on a registry."""
    p = command(
        "publish",
        _publish,
        "List a hosted dataset or model on an OpenGrid registry, where scientists find it: "
        "a description signed with the host's key, never the data. The schema (columns or "
        "dtype and shape), size, access modes and a summary of this host's approval rules "
        "are filled in. Publishing the same name again edits the listing (its version goes "
        "up, its ID stays).",
        'duet-host publish ages --name "Made-up patients" --license CC-BY-4.0 \\\n'
        '    --summary "Age, weight and smoking of 1000 made-up patients" \\\n'
        "    --description-file ages.md --tag health --tag synthetic\n"
        "duet-host publish ages --name ... --license MIT --registry http://127.0.0.1:8780",
    )
    p.add_argument("tag", metavar="NAME", help="the hosted dataset's name (its first tag)")
    p.add_argument("--name", required=True, metavar="TEXT", help="the listing's title")
    p.add_argument("--license", required=True, metavar="SPDX",
                   help="an SPDX license ID: MIT, CC-BY-4.0, LicenseRef-... ")  # fmt: skip
    p.add_argument("--summary", default="", metavar="TEXT", help="one line (<= 500 characters)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--description", default="", metavar="MARKDOWN",
                      help="the long description, in Markdown")  # fmt: skip
    text.add_argument("--description-file", metavar="PATH",
                      help="read the description from a Markdown file")  # fmt: skip
    p.add_argument("--tag", action="append", default=[], metavar="KEYWORD", dest="keywords",
                   help="a keyword scientists search for (repeat for more)")  # fmt: skip
    p.add_argument("--modality", metavar="KIND",
                   help="tabular, image, text, audio, time-series, graph or other "
                   "(default: inferred)")  # fmt: skip
    p.add_argument("--usage-conditions", default="", metavar="TEXT",
                   help="what scientists agree to when they use it")  # fmt: skip
    p.add_argument("--citation", metavar="TEXT", help="how to cite it")
    p.add_argument("--sample-file", metavar="CSV",
                   help="a few made-up records to publish with the listing, so scientists "
                   "can dry-run code on them: a CSV file whose header names the columns, "
                   f"at most {MAX_SAMPLE_ROWS} rows, an empty cell for a missing value. "
                   "Everyone sees it: a row copied from the hosted data is refused")  # fmt: skip
    p.add_argument("--registry", metavar="URL", help=_REGISTRY_HELP)
    p = command(
        "unpublish",
        _unpublish,
        "Delete a listing from the registry (a deletion signed with the host's key).",
        "duet-host unpublish ages\nduet-host unpublish ages --registry http://127.0.0.1:8780",
    )
    p.add_argument("tag", metavar="NAME", help="the name it was published as")
    p.add_argument("--registry", metavar="URL",
                   help="only from this registry (default: every registry it is on)")  # fmt: skip
    command("listings", _listings,
            "List what this host published: name, listing ID, version, registry.",
            "duet-host listings\nduet-host listings --json")  # fmt: skip
    p = command(
        "inbox",
        _inbox,
        "List session requests scientists sent through the registry (times in your time "
        "zone, their message opened), or answer one: accept it (at the first proposed time, "
        "or --at one of them), decline it, or propose other times. The scientist sees your "
        "answer, and the agreed time in their own time zone.",
        "duet-host inbox\n"
        f"duet-host inbox accept {_JOB}\n"
        f"duet-host inbox accept {_JOB} --at 2030-06-03T14:00\n"
        f'duet-host inbox decline {_JOB} --reason "we are closed that week"\n'
        f"duet-host inbox propose {_JOB} --at 2030-06-04T09:00 --at 2030-06-05T09:00 \\\n"
        '    --message "mornings suit us better"',
    )
    p.add_argument("action", nargs="?", choices=("accept", "decline", "propose"),
                   metavar="ACTION", help="accept, decline or propose (none: list)")  # fmt: skip
    p.add_argument("request_id", nargs="?", metavar="ID", help="the request's ID, as listed")
    p.add_argument("--at", action="append", default=[], type=_iso_time, metavar="TIME",
                   help="ISO date and time (local unless it names an offset), e.g. "
                   "2030-06-03T14:00; accept: one of the proposed times; propose: 1 to 5 "
                   "(repeat --at)")  # fmt: skip
    p.add_argument("--reason", default="", metavar="TEXT",
                   help="decline: why, sealed to the scientist")  # fmt: skip
    p.add_argument("--message", default="", metavar="TEXT",
                   help="propose: a note, sealed to the scientist")  # fmt: skip


def _iso_time(text: str) -> float:
    """An ISO 8601 date and time as UTC epoch seconds (naive: this machine's time zone)."""
    from datetime import datetime

    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{printable(text, 60)!r} is not an ISO date and time such as 2030-06-03T14:00"
        ) from None
    return (when if when.tzinfo is not None else when.astimezone()).timestamp()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``duet-host``; the exit status (0 done, 1 refused or failed, 2 bad usage)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except DuetError as exc:
        print(f"{PROG}: error: {printable(str(exc), 2000)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# --- commands that need no running host -------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    path = Path(args.path or args.config)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{path} exists; not overwriting it") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(TEMPLATE)
    print(f"Wrote {path}: set signaling_url and your [[datasets]], then run")
    print(f"  {PROG} serve --config {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from duet_p2p.host.serve import serve

    return serve(Path(args.config))


def _id(args: argparse.Namespace) -> int:
    from duet_p2p.identity import Identity
    from duet_p2p.paths import data_dir

    settings = _load(args.config).settings
    folder = Path(settings.data_dir or data_dir()) / "identities"
    identity = Identity.load(settings.name, directory=folder)
    if getattr(args, "json", False):
        print(json.dumps({"host_id": identity.id, "public_key": identity.public_key.hex()}))
    else:
        print(identity.id)
    return 0


def _load(config: str) -> HostConfig:
    path = Path(config)
    if not path.exists():
        raise ConfigurationError(
            f"no config file at {path}: pass --config PATH (or --socket PATH), set "
            f"${CONFIG_ENV}, or write one with `{PROG} init {path}`"
        )
    from duet_p2p.host.config import load_config

    return load_config(path)


# --- commands for the running host ------------------------------------------------------


def _ask(args: argparse.Namespace, command: str, **command_args: Any) -> Any:
    path = Path(args.socket) if args.socket else socket_path(_load(args.config).host_dir)
    return request(path, command, command_args)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=True, sort_keys=True))


def _status(args: argparse.Namespace) -> int:
    result = _ask(args, "status")
    if args.json:
        _print_json(result)
        return 0
    if not isinstance(result, dict):
        raise DuetError("the host sent a malformed status")
    keys = [_text(key, 60) for key in result]
    width = max((len(key) for key in keys), default=0)
    for key, value in zip(keys, result.values(), strict=True):
        print(f"{key + ':':<{width + 1}} {_text(value, 500)}")
    return 0


def _requests(args: argparse.Namespace) -> int:
    result = _ask(args, "requests", all=args.all)
    if args.json:
        _print_json(result)
        return 0
    columns = ["Request ID", "Name", "Client", "Status", "Size", "Requested", "Reason", "Checks"]
    if args.all:
        columns += ["Decided", "By"]
    rows = []
    for row in _rows(result, "requests"):
        cells = [
            _label(row.get("request_id")),
            _text(row.get("name")),
            _text(row.get("client_id")),
            _text(row.get("status")),
            _size(row.get("size_bytes")),
            _clock(row.get("requested_at")),
            _text(row.get("reason")),
            _text(row.get("checks")),
        ]
        if args.all:
            cells += [_clock(row.get("decided_at")), _text(row.get("decided_by"))]
        rows.append(cells)
    empty = "No requests yet." if args.all else "No requests are waiting for you."
    print(Table(columns, rows, index=False, empty_text=empty))
    return 0


def _accept(args: argparse.Namespace) -> int:
    result = _ask(args, "accept", request_id=args.request_id)
    return _done(args, result, "Request", "request_id", args.request_id, "accepted")


def _deny(args: argparse.Namespace) -> int:
    result = _ask(args, "deny", request_id=args.request_id, reason=args.reason)
    return _done(args, result, "Request", "request_id", args.request_id, "denied")


def _admissions(args: argparse.Namespace) -> int:
    result = _ask(args, "admissions")
    if args.json:
        _print_json(result)
        return 0
    rows = [
        [
            _text(row.get("client_id")),
            _text(row.get("status")),
            _clock(row.get("decided_at", row.get("requested_at"))),
            _text(row.get("note")),
        ]
        for row in _rows(result, "admissions")
    ]
    columns = ["Client ID", "Status", "Since", "Note"]
    print(Table(columns, rows, index=False, empty_text="No scientist has asked to join yet."))
    return 0


def _admit(args: argparse.Namespace) -> int:
    result = _ask(args, "admit", client_id=args.client_id)
    return _done(args, result, "Client", "client_id", args.client_id, "admitted")


def _refuse(args: argparse.Namespace) -> int:
    result = _ask(args, "refuse", client_id=args.client_id, reason=args.reason)
    return _done(args, result, "Client", "client_id", args.client_id, "refused")


def _audit(args: argparse.Namespace) -> int:
    if not 1 <= args.last <= MAX_AUDIT_LAST:
        raise ConfigurationError(f"--last must be from 1 to {MAX_AUDIT_LAST}")
    result = _ask(args, "audit", last=args.last)
    if args.json:
        _print_json(result)
        return 0
    rows = []
    for entry in _rows(result, "audit"):
        when = entry.get("ts", entry.get("time"))
        when_text = _clock(when) if _is_number(when) else _text(when, 40)
        rest = [(k, v) for k, v in entry.items() if k not in ("ts", "time", "event")]
        summary = ", ".join(f"{_text(k, 40)}={_text(v, 80)}" for k, v in rest[:_ROW_KEYS_SHOWN])
        rows.append([when_text, _text(entry.get("event"), 40), summary])
    table = Table(
        ["Time", "Event", "Summary"],
        rows,
        index=False,
        empty_text="The audit log is empty.",
        max_cell_chars=100,
    )
    print(table)
    return 0


# --- jobs --------------------------------------------------------------------------------


def _jobs(args: argparse.Namespace) -> int:
    result = _ask(args, "jobs", all=args.all)
    if args.json:
        _print_json(result)
        return 0
    rows = [
        [_text(row.get("job_id"), 64), _text(row.get("client_id"), 64),
         _text(row.get("state"), 40), _plan(row), _clock(row.get("submitted_at")),
         _text(row.get("reason"))]
        for row in _rows(result, "jobs")
    ]  # fmt: skip
    columns = ["Job ID", "Client ID", "State", "Plan", "Submitted", "Reason"]
    empty = "No jobs yet." if args.all else "No open jobs."
    print(Table(columns, rows, index=False, empty_text=empty))
    return 0


def _decision(args: argparse.Namespace) -> int:
    """approve, reject, release or withhold a job."""
    reason = {"reason": args.reason} if hasattr(args, "reason") else {}
    result = _ask(args, args.command, job_id=args.job_id, **reason)
    if args.json:
        _print_json(result)
        return 0
    answer = result if isinstance(result, dict) else {}
    job_id = _text(answer.get("job_id") or args.job_id, 80)
    decision = _text(answer.get("decision") or _DECIDED[args.command], 40)
    state = _text(answer.get("state"), 40)
    print(f"Job {job_id}: {decision}" + (f" (now {state})" if state and state != decision else ""))
    return 0


_DECIDED = {"approve": "approved", "reject": "rejected", "release": "released",
            "withhold": "withheld", "cancel": "cancelled"}  # fmt: skip


def _job(args: argparse.Namespace) -> int:
    result = _ask(args, "job", job_id=args.job_id)
    if args.json:
        _print_json(result)
        return 0
    if not isinstance(result, dict) or not isinstance(result.get("job"), dict):
        raise DuetError("the host sent a malformed job")
    job = result["job"]
    job_id = _text(job.get("job_id"), 64)
    progress = job.get("progress")
    rows = [
        ("Job ID", job_id), ("Client ID", _text(job.get("client_id"), 64)),
        ("State", _text(job.get("state"), 40)), ("Reason", _text(job.get("reason"), 1000)),
        ("By", _text(job.get("last_by"))), ("Plan", _plan(job)),
        ("Submitted", _date(job.get("submitted_at"))), ("Deadline", _date(job.get("deadline"))),
    ]  # fmt: skip
    if isinstance(progress, list) and len(progress) == 2 and job.get("started_at") is not None:
        rows.append(("Progress", f"{_text(progress[0])} of {_text(progress[1])} steps"))
    print(Table(["Field", "Value"], rows, f"Job {job_id}", index=False, max_cell_chars=200))
    print()
    review = result.get("review")
    if isinstance(review, dict):
        print(_review_table(review))
    else:
        print(f"No code review: {_text(result.get('review_error'), 500)}")
    print()
    outputs = [
        [_text(o.get("name"), 64), _text(o.get("status"), 40) + (" (failed)" if o.get("error")
         else ""), _text(o.get("lineage"), 2000), _count(o.get("elements")),
         _size(o.get("size_bytes")), _text(o.get("aggregation_text"), 60),
         _text(o.get("checks"), 500)]
        for o in _rows(result.get("outputs", []), "outputs")
    ]  # fmt: skip
    columns = ["Output", "Status", "Lineage", "Elements", "Size", "Aggregation", "Checks"]
    print(Table(columns, outputs, "Outputs", index=False, max_cell_chars=100,
                empty_text="No outputs."))  # fmt: skip
    print()
    events = [
        [_date(e.get("at")), _text(e.get("old"), 40), _text(e.get("new"), 40),
         _text(e.get("by")), _text(e.get("reason"), 1000)]
        for e in _rows(result.get("events", []), "events")
    ]  # fmt: skip
    print(Table(["At", "From", "To", "By", "Reason"], events, "Trail", index=False,
                max_cell_chars=100, empty_text="No events."))  # fmt: skip
    hint = _NEXT.get(str(job.get("state")))
    if hint:
        print()
        print(hint.format(prog=PROG, id=job_id))
    return 0


_NEXT = {
    "pending_review": "Decide: {prog} approve {id}\n    or: {prog} reject {id} --reason TEXT",
    "pending_output_review": "Decide: {prog} release {id}\n    or: {prog} withhold {id} "
    "--reason TEXT",
}


def _review_table(review: dict[str, Any]) -> Table:
    rows = [
        ("Job hash", _text(review.get("job_hash"), 64)),
        ("Plan hash", _text(review.get("plan_hash"), 64)),
        ("Plan", _plan(review)),
        ("Reason", _text(review.get("reason"), 4000)),
    ]
    for problem in _list(review.get("problems")):
        rows.append(("Problem", _text(problem, 1000)))
    for item in _list(review.get("inputs")):
        if isinstance(item, dict):
            where = "hosted" if item.get("hosted") is True else "NOT HOSTED"
            rows.append((f"Input {_text(item.get('name'), 64)}",
                         f"{_text(item.get('tag'))} ({where})"))  # fmt: skip
    for item in _list(review.get("outputs")):
        if isinstance(item, dict):
            rows.append((f"Output {_text(item.get('name'), 64)}",
                         _text(item.get("lineage"), 2000) or "(made by no step)"))  # fmt: skip
    rows.append(("Ops", _text(review.get("ops"), 2000)))
    limits = (f"{_number(review.get('max_seconds'))} s, "
              f"{_number(review.get('max_result_elements'))} elements, "
              f"{_number(review.get('max_result_bytes'))} bytes")  # fmt: skip
    rows += [("Limits", limits), ("Created", _date(review.get("created_at")))]
    status = "can run" if review.get("ok") is True else "cannot run"
    return Table(["Field", "Value"], rows, f"Code review ({status})", index=False,
                 max_cell_chars=500)  # fmt: skip


def _plan(row: dict[str, Any]) -> str:
    steps = row.get("steps")
    name = _text(row.get("plan"), 64)
    if isinstance(steps, int) and not isinstance(steps, bool):
        return f"{name} ({steps} step{'' if steps == 1 else 's'})"
    return name


def _count(value: Any) -> int | str:
    return value if isinstance(value, int) and not isinstance(value, bool) else ""


def _number(value: Any) -> str:
    if _is_number(value) and math.isfinite(value):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return "?"


def _list(value: Any) -> list[Any]:
    return value[:10_000] if isinstance(value, list) else []


def _date(value: Any) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return ""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    except (OverflowError, OSError, ValueError):
        return "?"


def _done(
    args: argparse.Namespace, result: Any, kind: str, key: str, typed: str, default: str
) -> int:
    """Report a decision the host made."""
    if args.json:
        _print_json(result)
        return 0
    answer = result if isinstance(result, dict) else {}
    ident = answer.get(key) if isinstance(answer.get(key), str) else typed
    status = answer.get("status") if isinstance(answer.get("status"), str) else default
    shown = _label(ident) if key == "request_id" else _text(ident, 80)
    print(f"{kind} {shown}: {_text(status, 40)}")
    return 0


# --- the registry -------------------------------------------------------------------------

MAX_DESCRIPTION_CHARS = 50_000
MAX_SAMPLE_FILE_BYTES = 256 * 1024


def _read_text(path: str, max_bytes: int, encoding: str = "utf-8") -> tuple[str, bool]:
    """A regular file's first ``max_bytes`` bytes as text, and whether there was more."""
    from duet_p2p.host.config import open_regular

    try:
        with open_regular(Path(path)) as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return raw[:max_bytes].decode(encoding), len(raw) > max_bytes
    except UnicodeDecodeError:
        raise ConfigurationError(f"{path} is not UTF-8 text") from None


def _read_description(path: str) -> str:
    text, more = _read_text(path, 4 * MAX_DESCRIPTION_CHARS)
    if more or len(text) > MAX_DESCRIPTION_CHARS:
        raise ConfigurationError(f"{path} is longer than {MAX_DESCRIPTION_CHARS} characters")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_sample(path: str) -> dict[str, list[Any]]:
    """A CSV file as ``{"columns", "rows"}`` of text (the host reads each cell by its
    column's dtype)."""
    import csv
    import io

    text, more = _read_text(path, MAX_SAMPLE_FILE_BYTES, "utf-8-sig")
    if more:
        raise ConfigurationError(f"{path} is larger than {MAX_SAMPLE_FILE_BYTES} bytes")
    try:
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise ConfigurationError(f"{path} is not CSV: {exc}") from None
    lines = [line for line in lines if line]
    if len(lines) < 2:
        raise ConfigurationError(f"{path} needs a header row and at least one row")
    if len(lines) - 1 > MAX_SAMPLE_ROWS:
        raise ConfigurationError(f"{path} has more than {MAX_SAMPLE_ROWS} rows")
    header, rows = lines[0], lines[1:]
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ConfigurationError(f"line {number} of {path} has {len(row)} values, "
                                     f"the header {len(header)}")  # fmt: skip
    return {"columns": header, "rows": rows}


def _publish(args: argparse.Namespace) -> int:
    description = args.description
    if args.description_file:
        description = _read_description(args.description_file)
    result = _ask(
        args, "publish", tag=args.tag, name=args.name, summary=args.summary,
        description=description, license=args.license, keywords=list(args.keywords),
        registry=args.registry, modality=args.modality,
        usage_conditions=args.usage_conditions, citation=args.citation,
        sample=_read_sample(args.sample_file) if args.sample_file else None,
    )  # fmt: skip
    if args.json:
        _print_json(result)
        return 0
    answer = result if isinstance(result, dict) else {}
    print(f"Published {_text(answer.get('tag') or args.tag, 100)!r} as listing "
          f"{_text(answer.get('listing_id'), 64)} (version {_text(answer.get('version'), 20)}) "
          f"on {_text(answer.get('registry'), 500)}")  # fmt: skip
    return 0


def _unpublish(args: argparse.Namespace) -> int:
    result = _ask(args, "unpublish", tag=args.tag, registry=args.registry)
    if args.json:
        _print_json(result)
        return 0
    answer = result if isinstance(result, dict) else {}
    deleted = _list(answer.get("deleted"))
    print(f"Deleted {len(deleted)} listing{'s' * (len(deleted) != 1)} of {args.tag!r}: "
          + ", ".join(_text(d, 64) for d in deleted))  # fmt: skip
    return 0


def _listings(args: argparse.Namespace) -> int:
    result = _ask(args, "listings")
    if args.json:
        _print_json(result)
        return 0
    rows = [
        [_text(row.get("tag"), 100), _text(row.get("listing_id"), 64),
         _text(row.get("version"), 20), _text(row.get("name")), _text(row.get("registry"), 500),
         _date(row.get("updated_at"))]
        for row in _rows(result, "listings")
    ]  # fmt: skip
    columns = ["Name", "Listing ID", "Version", "Title", "Registry", "Updated"]
    print(Table(columns, rows, index=False, max_cell_chars=80,
                empty_text=f"Nothing published yet: {PROG} publish NAME --name ... --license "
                "..."))  # fmt: skip
    return 0


def _inbox(args: argparse.Namespace) -> int:
    if args.action is None:
        if args.request_id or args.at or args.reason or args.message:
            raise ConfigurationError("to answer a request: inbox accept|decline|propose ID ...")
        return _inbox_list(args)
    if not args.request_id:
        raise ConfigurationError(f"inbox {args.action} needs the request's ID")
    rid = args.request_id
    if args.action == "accept":
        if len(args.at) > 1:
            raise ConfigurationError("accept takes one --at (one of the proposed times)")
        result = _ask(args, "inbox_accept", request_id=rid, at=args.at[0] if args.at else None)
    elif args.action == "decline":
        result = _ask(args, "inbox_decline", request_id=rid, reason=args.reason)
    else:
        if not args.at:
            raise ConfigurationError("propose needs --at TIME (1 to 5 of them)")
        result = _ask(args, "inbox_propose", request_id=rid, times=list(args.at),
                      message=args.message)  # fmt: skip
    if args.json:
        _print_json(result)
        return 0
    answer = result if isinstance(result, dict) else {}
    line = f"Session request {_text(answer.get('request_id') or rid, 64)}: "
    line += _text(answer.get("status"), 40)
    if _is_number(answer.get("start")):
        line += f" at {_local(answer['start'])}"
    elif answer.get("status") == "proposed":
        line += " " + ", ".join(_local(t) for t in _list(answer.get("proposed"))[:10])
    print(line)
    return 0


def _inbox_list(args: argparse.Namespace) -> int:
    result = _ask(args, "inbox")
    if args.json:
        _print_json(result)
        return 0
    if not isinstance(result, dict):
        raise DuetError("the host sent a malformed inbox")
    rows = [
        [_text(row.get("request_id"), 64), _text(row.get("listing"), 100),
         _text(row.get("scientist_id"), 64),
         ", ".join(_local(t) for t in _list(row.get("proposed"))[:10]),
         _text(row.get("minutes"), 10), _text(row.get("message"), 2000),
         _text(row.get("status"), 40), _local(row.get("start"))]
        for row in _rows(result.get("results"), "inbox")
    ]  # fmt: skip
    if isinstance(result.get("note"), str):
        print(_text(result["note"], 1000))
    columns = ["Request ID", "Listing", "Scientist ID", "Proposed (local)", "Minutes",
               "Message", "Status", "Start (local)"]  # fmt: skip
    print(Table(columns, rows, index=False, max_cell_chars=80,
                empty_text="No session requests."))  # fmt: skip
    return 0


def _local(value: Any) -> str:
    """A UTC epoch time in this machine's time zone: 2030-06-03 14:00 CEST."""
    if not _is_number(value) or not math.isfinite(value):
        return ""
    try:
        return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(value)).strip()
    except (OverflowError, OSError, ValueError):
        return "?"


# --- cells: everything the host sends is made printable ---------------------------------


def _rows(result: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(result, list) or not all(isinstance(row, dict) for row in result):
        raise DuetError(f"the host sent a malformed {what} list")
    return result


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: Any, limit: int = _TEXT_CHARS) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return printable(value, limit)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _is_number(value):
        return str(value)
    if isinstance(value, list):
        return printable(", ".join(_text(item, limit) for item in value[:100]), limit)
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        return "?"
    return printable(text[: limit * 4], limit)


def _label(value: Any) -> str:
    return uid_label(_text(value, 64)) if value else ""


def _size(value: Any) -> str:
    return format_size(value) if _is_number(value) else ""


def _clock(value: Any) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return ""
    try:
        return format_clock(value)
    except (OverflowError, OSError, ValueError):
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
