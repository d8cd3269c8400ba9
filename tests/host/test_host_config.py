"""host.toml: a full config round trip, and every way a file is refused, field by field."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from duet_p2p import paths
from duet_p2p.errors import ConfigurationError
from duet_p2p.host.config import (
    MAX_CONFIG_BYTES,
    BudgetSpec,
    HandlerSpec,
    load_config,
    parse_config,
)
from duet_p2p.limits import OwnerLimits
from duet_p2p.offline.policy import JobPolicy, ReleaseRule
from duet_p2p.permissions.request import RequestQueue

ROOT = Path(__file__).resolve().parents[2]
CLIENT = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"

FULL = f"""
[host]
name = "lab-1"
signaling_url = "https://127.0.0.1:8443/"
admit = ["{CLIENT.upper()}", "{OTHER}", "{CLIENT}"]
data_dir = "state"
keep_released_hours = 2
request_expiry_hours = 0.5
min_aggregation = 3
max_scientists = 4
max_pending_admissions = 8
log_level = "debug"
host_addresses = ["127.0.0.1", "::1"]
ice_servers = [{{ urls = ["turn:127.0.0.1:3478"], username = "u", credential = "c" }},
               {{ urls = "stun:127.0.0.1" }}]

[limits]
max_op_seconds = 30
worker_threads = 3
seccomp = false
max_worker_restarts = 0

[[datasets]]
name = "ages"
path = "data/ages.csv"
tags = ["demographics", "ages"]
description = "two lines\\nof text"
public = true
searchable = false
show_metadata = true
identifier = "patient_id"
rows_per_identifier = 2

[[datasets]]
name = "scans.v2"
path = "scans.bin"
format = "npy"
columns = ["a", "b"]
identifier = "a"

[[handlers]]
name = "dp"
action = "accept"
tags = ["demographics"]
dp = true
max_epsilon = 0.5
max_delta = 1e-6
min_aggregation = 1
ignore_disclosure_checks = true
print_local = true
log_local = true

[[handlers]]
name = "no"
action = "deny"
op = "torch.Tensor.item"
max_elements = 10
max_requests = 5
timeout_secs = 60
reason = "no"

[[budgets]]
dataset = "ages"
epsilon = 1

[[budgets]]
dataset = "demographics"
epsilon = 2.5
delta = 1e-7
client_id = "{CLIENT.upper()}"

[[budgets]]
dataset = "ages"
epsilon = 10.0
total = true
"""

MINIMAL = """
[host]
signaling_url = "http://127.0.0.1:8765"

[[datasets]]
name = "ages"
path = "data/ages.csv"

[[handlers]]
name = "h"
action = "accept"

[[budgets]]
dataset = "ages"
epsilon = 1.0
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ages.csv").write_text("patient_id,age\n1,30\n")
    (tmp_path / "scans.bin").write_bytes(b"")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "host.toml"
    path.write_text(text)
    return path


def refused(folder: Path, text: str) -> str:
    path = write(folder, text)
    with pytest.raises(ConfigurationError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    return message[len(f"{path}: ") :]


def edit(old: str, new: str, base: str = MINIMAL) -> str:
    assert old in base
    return base.replace(old, new, 1)


def test_full_config_round_trip(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")  # relative paths follow the file, not the working directory
    config = load_config(write(folder, FULL))
    s = config.settings
    assert config.source == folder / "host.toml"
    assert (s.name, s.signaling_url, s.log_level) == ("lab-1", "https://127.0.0.1:8443", "debug")  # fmt: skip
    assert s.admit == (CLIENT, OTHER)
    assert s.data_dir == folder.resolve() / "state"
    assert s.keep_released_seconds == 7200.0 and s.request_expiry_seconds == 1800.0
    assert (s.min_aggregation, s.max_scientists, s.max_pending_admissions) == (3.0, 4, 8)
    assert s.host_addresses == ("127.0.0.1", "::1")
    assert s.ice_servers == (
        {"urls": ["turn:127.0.0.1:3478"], "username": "u", "credential": "c"},
        {"urls": ["stun:127.0.0.1"]},
    )
    assert config.limits == OwnerLimits(
        max_op_seconds=30.0, worker_threads=3, seccomp=False, max_worker_restarts=0
    )
    assert isinstance(config.limits.max_op_seconds, float)
    ages, scans = config.datasets
    assert ages.path == folder.resolve() / "data" / "ages.csv" and ages.format == "csv"
    assert ages.tags == ("demographics",)  # the name is the first tag, not repeated
    assert ages.description == "two lines\nof text"
    assert (ages.public, ages.searchable, ages.show_metadata) == (True, False, True)
    assert (ages.identifier, ages.rows_per_identifier, ages.columns) == ("patient_id", 2, None)
    assert ages.where == f"{folder / 'host.toml'}: datasets[0]"
    assert (scans.name, scans.format, scans.columns, scans.identifier) == (
        "scans.v2", "npy", ("a", "b"), "a",
    )  # fmt: skip
    assert config.handlers == (
        HandlerSpec("dp", "accept", {"tags": ("demographics",), "dp": True, "max_epsilon": 0.5,
                    "max_delta": 1e-6, "min_aggregation": 1.0, "ignore_disclosure_checks": True,
                    "print_local": True, "log_local": True}),
        HandlerSpec("no", "deny", {"op": "torch.Tensor.item", "max_elements": 10,
                    "max_requests": 5, "timeout_secs": 60.0, "reason": "no"}),
    )  # fmt: skip
    assert config.budgets == (
        BudgetSpec("ages", 1.0),
        BudgetSpec("demographics", 2.5, 1e-7, CLIENT),
        BudgetSpec("ages", 10.0, total=True),
    )
    assert config.host_dir == folder.resolve() / "state" / "hosts" / "lab-1"


def test_minimal_config_defaults(folder: Path) -> None:
    config = load_config(write(folder, MINIMAL))
    s = config.settings
    assert (s.name, s.admit, s.data_dir, s.log_level) == ("host", "ask", None, "info")
    assert s.keep_released_seconds == 168 * 3600 and s.request_expiry_seconds is None
    assert (s.max_scientists, s.max_pending_admissions, s.min_aggregation) == (16, 32, 1.0)
    assert s.host_addresses is None and s.ice_servers is None
    assert config.limits == OwnerLimits()
    assert config.host_dir == paths.data_dir() / "hosts" / "host"
    assert not config.host_dir.exists()  # named, not created


def test_parse_config_takes_parsed_toml(folder: Path) -> None:
    config = parse_config(tomllib.loads(MINIMAL), folder / "any.toml")
    assert config.datasets[0].path == folder.resolve() / "data" / "ages.csv"
    with pytest.raises(ConfigurationError, match=r"^x.toml: \(top level\): must be a table"):
        parse_config([], Path("x.toml"))  # type: ignore[arg-type]


def test_handler_spec_adds_itself_to_a_queue(folder: Path) -> None:
    config = load_config(write(folder, FULL))
    queue = RequestQueue(on_decision=lambda request: None)
    handlers = [spec.add_to(queue) for spec in config.handlers]
    assert list(queue.handlers) == handlers
    dp, no = handlers
    assert (dp.name, dp.action, dp.tags, dp.dp, dp.max_epsilon) == (
        "dp", "accept", frozenset({"demographics"}), True, 0.5,
    )  # fmt: skip
    assert (no.name, no.action, no.op, no.max_requests, no.timeout_secs, no.reason) == (
        "no", "deny", "torch.Tensor.item", 5, 60.0, "no",
    )  # fmt: skip


def test_example_config_parses() -> None:
    config = load_config(ROOT / "examples" / "host" / "host.toml")
    assert config.settings.signaling_url.startswith("http")
    assert [d.name for d in config.datasets] == ["ages"]
    assert all(d.path.is_file() for d in config.datasets)
    assert config.handlers and config.budgets


JOBS = f"""
[jobs]
enabled = false
concurrency = 3
on_restart = "requeue"
max_job_seconds = 7200
mailbox = false
poll_seconds = 5
approve_clients = ["{CLIENT.upper()}"]
approve_plans = ["{"ab" * 32}"]
approve_ops = ["torch.Tensor.mean", "torch.nn.functional.relu"]
max_seconds = 600

[[jobs.release]]
name = "accuracy only"
outputs = ["accuracy"]
max_elements = 1

[[jobs.release]]
tags = ["ages"]
op = "torch.Tensor.mean"
min_aggregation = 20
"""


def test_jobs_table(folder: Path) -> None:
    from duet_p2p.host.jobs import JobSettings

    config = load_config(write(folder, MINIMAL + JOBS))
    policy = JobPolicy(
        approve_clients=frozenset({CLIENT}), approve_plans=frozenset({"ab" * 32}),
        approve_ops=frozenset({"torch.Tensor.mean", "torch.nn.functional.relu"}),
        max_seconds=600.0,
        release=(ReleaseRule(name="accuracy only", outputs=frozenset({"accuracy"}),
                             max_elements=1),
                 ReleaseRule(tags=frozenset({"ages"}), op="torch.Tensor.mean",
                             min_aggregation=20.0)),
    )  # fmt: skip
    expected = JobSettings(enabled=False, policy=policy, concurrency=3, on_restart="requeue",
                           max_job_seconds=7200.0, mailbox=False, poll_seconds=5.0)  # fmt: skip
    assert config.jobs == expected
    assert config.jobs is config.jobs  # made once
    assert isinstance(config.jobs.max_job_seconds, float)


def test_jobs_defaults(folder: Path) -> None:
    from duet_p2p.host.jobs import JobSettings

    assert load_config(write(folder, MINIMAL)).jobs == JobSettings()
    assert load_config(write(folder, MINIMAL + "[jobs]\n")).jobs == JobSettings()


def test_job_limits_agree_with_the_job_machinery() -> None:
    from duet_p2p.host import config, jobs

    assert config.MAX_CONCURRENCY == jobs.MAX_CONCURRENCY
    assert config.ON_RESTART == jobs.ON_RESTART


def test_reading_jobs_does_not_import_torch(folder: Path) -> None:
    path = write(folder, MINIMAL + JOBS)
    code = (
        "import sys; from duet_p2p.host.config import load_config; "
        f"c = load_config({str(path)!r}); assert c.job_options.concurrency == 3; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
        "assert not bad, bad[:5]"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr


# -- refused, naming the field -------------------------------------------------------------

PATH_CASES = [
    # unknown keys anywhere
    (MINIMAL + "\n[extra]\n", "extra: unknown key"),
    (edit("[host]\n", "[host]\nadmitt = 'any'\n"), "host.admitt: unknown key"),
    (edit('path = "data/ages.csv"', 'path = "data/ages.csv"\npubilc = true'),
     "datasets[0].pubilc: unknown key"),
    (edit('action = "accept"', 'action = "accept"\nmax_epsilom = 1.0'),
     "handlers[0].max_epsilom: unknown key"),
    (edit("epsilon = 1.0", "epsilon = 1.0\nclient = 'x'"), "budgets[0].client: unknown key"),
    (MINIMAL + "[limits]\nmax_op_second = 1.0\n", "limits.max_op_second: unknown key"),
    # sections of the wrong shape
    ("host = 1\n", "host: must be a table"),
    (edit("[[datasets]]", "[datasets]"), "datasets: must be an array of tables ([[datasets]])"),
    # [host]
    ("[host]\nname = 'x'\n", "host.signaling_url: required"),
    (edit('"http://127.0.0.1:8765"', '"ftp://127.0.0.1"'), "host.signaling_url: must be http(s)"),
    (edit('"http://127.0.0.1:8765"', '"http://u:p@127.0.0.1"'), "host.signaling_url: must be"),
    (edit('"http://127.0.0.1:8765"', '"http://127.0.0.1:99999"'),
     "host.signaling_url: is not a valid URL"),
    (edit('"http://127.0.0.1:8765"', "8765"), "host.signaling_url: must be an http"),
    (edit("[host]\n", "[host]\nname = '../etc'\n"), "host.name: '../etc' is not valid"),
    (edit("[host]\n", "[host]\nname = ''\n"), "host.name: '' is not valid"),
    (edit("[host]\n", "[host]\nadmit = 'all'\n"),
     'host.admit: must be "ask", "any" or a list of Client IDs'),
    (edit("[host]\n", "[host]\nadmit = []\n"),
     'host.admit: must be "ask", "any" or a list of Client IDs'),
    (edit("[host]\n", f"[host]\nadmit = ['{CLIENT}', '{CLIENT[:-1]}']\n"),
     f"host.admit: must be \"ask\", \"any\" or a list of Client IDs: item 1: '{CLIENT[:-1]}' "
     "is not a Client ID"),
    (edit("[host]\n", f"[host]\nadmit = ['{CLIENT[:-1]}g']\n"), "host.admit: must be"),
    (edit("[host]\n", "[host]\nmax_scientists = true\n"),
     "host.max_scientists: must be an integer, not a boolean"),
    (edit("[host]\n", "[host]\nmax_scientists = 1001\n"),
     "host.max_scientists: must be >= 1 and <= 1000, not 1001"),
    (edit("[host]\n", "[host]\nmax_scientists = 4.0\n"),
     "host.max_scientists: must be an integer, not a number"),
    (edit("[host]\n", "[host]\nmax_pending_admissions = 0\n"),
     "host.max_pending_admissions: must be >= 1"),
    (edit("[host]\n", "[host]\nkeep_released_hours = 0\n"),
     "host.keep_released_hours: must be > 0"),
    (edit("[host]\n", "[host]\nkeep_released_hours = inf\n"),
     "host.keep_released_hours: must be > 0"),
    (edit("[host]\n", "[host]\nkeep_released_hours = '168'\n"),
     "host.keep_released_hours: must be a number, not a string"),
    (edit("[host]\n", "[host]\nrequest_expiry_hours = -1\n"),
     "host.request_expiry_hours: must be >= 0"),
    (edit("[host]\n", "[host]\nrequest_expiry_hours = nan\n"),
     "host.request_expiry_hours: must be >= 0"),
    (edit("[host]\n", "[host]\nmin_aggregation = 0.5\n"), "host.min_aggregation: must be >= 1"),
    (edit("[host]\n", "[host]\nlog_level = 'verbose'\n"),
     'host.log_level: must be "debug", "info", "warning" or "error"'),
    (edit("[host]\n", "[host]\nhost_addresses = ['10.0.0.300']\n"),
     "host.host_addresses: '10.0.0.300' is not an IP address"),
    (edit("[host]\n", "[host]\nhost_addresses = '127.0.0.1'\n"),
     "host.host_addresses: must be a list"),
    (edit("[host]\n", "[host]\nice_servers = [{ url = 'stun:x' }]\n"),
     "host.ice_servers: item 0: unknown key 'url'"),
    (edit("[host]\n", "[host]\nice_servers = [{ urls = ['http://x'] }]\n"),
     "host.ice_servers: item 0: urls must be stun:"),
    (edit("[host]\n", "[host]\nice_servers = [{ urls = ['turn:127.0.0.1'], username = 'u' }]\n"),
     "host.ice_servers: item 0: username and credential go together"),
    (edit("[host]\n", "[host]\ndata_dir = 3\n"), "host.data_dir: must be a string"),
    (edit("[host]\n", "[host]\nsignaling_url = 'http://a'\n"), "Cannot overwrite"),
    # [limits]
    (MINIMAL + "[limits]\nworker_threads = 1.5\n", "limits.worker_threads: must be an integer"),
    (MINIMAL + "[limits]\nworker_threads = 0\n", "limits.worker_threads: must be >= 1"),
    (MINIMAL + "[limits]\nmax_upload_bytes = true\n", "limits.max_upload_bytes: must be an int"),
    (MINIMAL + "[limits]\nseccomp = 1\n", "limits.seccomp: must be true or false, not an int"),
    (MINIMAL + "[limits]\nmax_op_seconds = 0\n", "limits.max_op_seconds: must be > 0"),
    (MINIMAL + "[limits]\nmax_op_seconds = inf\n", "limits.max_op_seconds: must be > 0"),
    (MINIMAL + "[limits]\nmax_worker_restarts = -1\n", "limits.max_worker_restarts: must be >="),
    # [[datasets]]
    (edit('name = "ages"\n', ""), "datasets[0].name: required"),
    (edit('path = "data/ages.csv"\n', ""), "datasets[0].path: required"),
    (edit('name = "ages"', 'name = "a/b"'), "datasets[0].name: 'a/b' is not valid"),
    (edit('name = "ages"', 'name = ["ages"]'), "datasets[0].name: must be a string, not an array"),
    (edit('"data/ages.csv"', '"data/nope.csv"'), "datasets[0].path: no such file: "),
    (edit('"data/ages.csv"', '"data"'), "datasets[0].path: not a regular file: "),
    (edit('"data/ages.csv"', '"scans.bin"'), "datasets[0].path: cannot tell the format"),
    (edit('path = "data/ages.csv"', 'path = "data/ages.csv"\nformat = "pickle"'),
     'datasets[0].format: must be "npy", "safetensors", "csv" or "parquet", not \'pickle\''),
    (edit('path = "data/ages.csv"', 'path = "data/ages.csv"\ntensor = "x"'),
     "datasets[0].tensor: applies to safetensors files only"),
    (edit('path = "data/ages.csv"', 'path = "data/ages.csv"\ncolumns = ["a"]'),
     "datasets[0].columns: a table (csv, parquet) brings its own columns"),
    (edit('path = "data/ages.csv"', 'path = "scans.bin"\nformat = "npy"\nidentifier = "a"'),
     "datasets[0].identifier: needs columns"),
    (edit('path = "data/ages.csv"',
          'path = "scans.bin"\nformat = "npy"\ncolumns = ["a"]\nidentifier = "b"'),
     "datasets[0].identifier: 'b' is not one of columns"),
    (edit('path = "data/ages.csv"', 'path = "scans.bin"\nformat = "npy"\ncolumns = ["a", "a"]'),
     "datasets[0].columns: has duplicates"),
    (edit('path = "data/ages.csv"', 'path = "data/ages.csv"\ntags = ["ok", ""]'),
     "datasets[0].tags[1]: must be a printable string"),
    (edit('path = "data/ages.csv"', 'path = "data/ages.csv"\ndescription = "' + "x" * 4001 + '"'),
     "datasets[0].description: longer than 4000 characters"),
    (edit('path = "data/ages.csv"', 'path = "data/ages.csv"\ndescription = "\\u001b[2J"'),
     "datasets[0].description: has control or invisible characters"),
    (edit('path = "data/ages.csv"', 'path = "data/ages.csv"\npublic = "false"'),
     "datasets[0].public: must be true or false, not a string"),
    (edit('path = "data/ages.csv"', 'path = "data/ages.csv"\nrows_per_identifier = 0'),
     "datasets[0].rows_per_identifier: must be >= 1"),
    (MINIMAL + '[[datasets]]\nname = "ages"\npath = "data/ages.csv"\n',
     "datasets[1].name: duplicate dataset name (also datasets[0])"),
    # [[handlers]]
    (edit('name = "h"\n', ""), "handlers[0].name: required"),
    (edit('action = "accept"\n', ""), "handlers[0].action: required"),
    (edit('action = "accept"', 'action = "allow"'),
     "handlers[0].action: must be \"accept\" or \"deny\", not 'allow'"),
    (edit('action = "accept"', 'action = "accept"\ndp = false\nmax_epsilon = 0.5'),
     "handlers[0]: max_epsilon applies to DP releases: it cannot go with dp=False"),
    (edit('action = "accept"', 'action = "accept"\ntags = ["agse"]'),
     "handlers[0].tags: 'agse' is neither the name nor a tag of any dataset"),
    (edit('action = "accept"', 'action = "deny"\nprint_local = true'),
     "handlers[0].print_local: applies to accept handlers only"),
    (edit('action = "accept"', 'action = "accept"\nreason = "why"'),
     "handlers[0].reason: applies to deny handlers only"),
    (edit('action = "accept"', 'action = "accept"\nmax_requests = -1'),
     "handlers[0].max_requests: must be >= 0"),
    (edit('action = "accept"', 'action = "accept"\nmax_elements = 1.0'),
     "handlers[0].max_elements: must be an integer"),
    (edit('action = "accept"', 'action = "accept"\ntimeout_secs = "60"'),
     "handlers[0].timeout_secs: must be a number, not a string"),
    (edit('action = "accept"', 'action = "accept"\ndp = 1'),
     "handlers[0].dp: must be true or false"),
    (edit('action = "accept"', 'action = "accept"\ntags = "ages"'),
     "handlers[0].tags: must be a list"),
    (MINIMAL + '[[handlers]]\nname = "h"\naction = "deny"\n',
     "handlers[1].name: duplicate handler name (also handlers[0])"),
    # [[budgets]]
    (edit("epsilon = 1.0\n", ""), "budgets[0].epsilon: required"),
    (edit('dataset = "ages"\n', ""), "budgets[0].dataset: required"),
    (edit("epsilon = 1.0", "epsilon = 0"), "budgets[0].epsilon: must be > 0"),
    (edit("epsilon = 1.0", "epsilon = true"), "budgets[0].epsilon: must be a number"),
    (edit("epsilon = 1.0", "epsilon = 1.0\ndelta = 1"), "budgets[0].delta: must be >= 0 and < 1"),
    (edit('dataset = "ages"', 'dataset = "agse"'), "budgets[0].dataset: 'agse' is neither"),
    (edit("epsilon = 1.0", "epsilon = 1.0\nclient_id = 'me'"),
     "budgets[0].client_id: 'me' is not a Client ID"),
    (edit("epsilon = 1.0", f"epsilon = 1.0\nclient_id = '{CLIENT}'\ntotal = true"),
     "budgets[0].client_id: cannot go with total = true"),
    (MINIMAL + '[[budgets]]\ndataset = "ages"\nepsilon = 3.0\n',
     "budgets[1].dataset: duplicate budget"),
    # [jobs]
    ("jobs = 1\n" + MINIMAL, "jobs: must be a table"),
    (MINIMAL + "[jobs]\nconcurency = 2\n", "jobs.concurency: unknown key; expected one of"),
    (MINIMAL + "[jobs]\nenabled = 'yes'\n", "jobs.enabled: must be true or false, not a string"),
    (MINIMAL + "[jobs]\nmailbox = 1\n", "jobs.mailbox: must be true or false"),
    (MINIMAL + "[jobs]\nconcurrency = 0\n", "jobs.concurrency: must be >= 1 and <= 16, not 0"),
    (MINIMAL + "[jobs]\nconcurrency = 17\n", "jobs.concurrency: must be >= 1 and <= 16"),
    (MINIMAL + "[jobs]\nconcurrency = 1.5\n", "jobs.concurrency: must be an integer"),
    (MINIMAL + "[jobs]\nconcurrency = true\n", "jobs.concurrency: must be an integer, not a"),
    (MINIMAL + "[jobs]\non_restart = 'retry'\n",
     'jobs.on_restart: must be "fail" or "requeue", not \'retry\''),
    (MINIMAL + "[jobs]\nmax_job_seconds = 0\n", "jobs.max_job_seconds: must be > 0"),
    (MINIMAL + "[jobs]\nmax_job_seconds = -5\n", "jobs.max_job_seconds: must be > 0"),
    (MINIMAL + "[jobs]\nmax_job_seconds = inf\n", "jobs.max_job_seconds: must be > 0"),
    (MINIMAL + "[jobs]\nmax_job_seconds = nan\n", "jobs.max_job_seconds: must be > 0"),
    (MINIMAL + "[jobs]\nmax_job_seconds = 1e10\n", "jobs.max_job_seconds: must be > 0 and <"),
    (MINIMAL + "[jobs]\nmax_job_seconds = '60'\n", "jobs.max_job_seconds: must be a number"),
    (MINIMAL + "[jobs]\npoll_seconds = 0\n", "jobs.poll_seconds: must be > 0 and <= 300"),
    (MINIMAL + "[jobs]\npoll_seconds = 301\n", "jobs.poll_seconds: must be > 0 and <= 300"),
    (MINIMAL + "[jobs]\napprove_clients = ['me']\n",
     "jobs.approve_clients[0]: 'me' is not a Client ID"),
    (MINIMAL + f"[jobs]\napprove_clients = '{CLIENT}'\n",
     "jobs.approve_clients: must be a list"),
    (MINIMAL + f"[jobs]\napprove_clients = ['{CLIENT}', '{CLIENT.upper()}']\n",
     "jobs.approve_clients: has duplicates"),
    (MINIMAL + "[jobs]\napprove_plans = ['ab']\n", "jobs.approve_plans[0]: 'ab' is not a plan"),
    (MINIMAL + "[jobs]\napprove_ops = ['os.system']\n",
     "jobs.approve_ops[0]: 'os.system' is not an op path"),
    (MINIMAL + "[jobs]\napprove_ops = [\"torch.\\u001b[2J\"]\n",
     "jobs.approve_ops[0]: must be printable text"),
    (MINIMAL + "[jobs]\nmax_seconds = 0\n", "jobs.max_seconds: must be > 0"),
    (MINIMAL + "[jobs]\nrelease = 'all'\n", "jobs.release: must be an array"),
    (MINIMAL + "[[jobs.release]]\noutput = ['a']\n", "jobs.release[0].output: unknown key"),
    (MINIMAL + "[[jobs.release]]\noutputs = ['1a']\n",
     "jobs.release[0].outputs[0]: '1a' is not an output name"),
    (MINIMAL + "[[jobs.release]]\nmax_elements = -1\n",
     "jobs.release[0].max_elements: must be an integer >= 0"),
    (MINIMAL + "[[jobs.release]]\nmin_aggregation = 0.5\n",
     "jobs.release[0].min_aggregation: must be >= 1"),
    (MINIMAL + "[[jobs.release]]\nname = \"a\\u0007b\"\n",
     "jobs.release[0].name: must be printable text"),
    (MINIMAL + "[[jobs.release]]\ntags = ['agse']\n",
     "jobs.release[0].tags: 'agse' is neither the name nor a tag of any dataset"),
    (MINIMAL + "[[jobs.release]]\nmax_elements = 1\n[[jobs.release]]\ntags = ['x']\n",
     "jobs.release[1].tags: 'x' is neither"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), PATH_CASES)
def test_refused_naming_the_field(folder: Path, text: str, expected: str) -> None:
    message = refused(folder, text)
    assert expected in message
    if "Cannot overwrite" not in expected:
        assert message.startswith(expected.split(":")[0]), message


def test_toml_syntax_error_names_the_line(folder: Path) -> None:
    message = refused(folder, MINIMAL + "\n[[handlers]]\nname = \n")
    line = len((MINIMAL + "\n[[handlers]]\nname = ").splitlines())
    assert message.startswith("invalid TOML: ") and f"line {line}" in message


def test_the_file_itself_is_checked(tmp_path: Path) -> None:
    missing = tmp_path / "none.toml"
    with pytest.raises(ConfigurationError, match=f"^{missing}: no such file$"):
        load_config(missing)
    with pytest.raises(ConfigurationError, match="not a regular file"):
        load_config(tmp_path)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigurationError, match="not a regular file"):
        load_config(fifo)  # refused at once: opening it does not wait for a writer
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigurationError, match="larger than 1048576 bytes"):
        load_config(big)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"a = '\xff'\n")
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        load_config(binary)


def test_budget_scopes_may_share_a_dataset(folder: Path) -> None:
    text = MINIMAL + f'[[budgets]]\ndataset = "ages"\nepsilon = 2.0\nclient_id = "{CLIENT}"\n'
    text += '[[budgets]]\ndataset = "ages"\nepsilon = 9.0\ntotal = true\n'
    budgets = load_config(write(folder, text)).budgets
    assert [(b.client_id, b.total) for b in budgets] == [(None, False), (CLIENT, False),
                                                          (None, True)]  # fmt: skip


def test_path_through_a_symlink_resolves(folder: Path) -> None:
    (folder / "link.csv").symlink_to(folder / "data" / "ages.csv")
    config = load_config(write(folder, edit('"data/ages.csv"', '"link.csv"')))
    assert config.datasets[0].path == (folder / "data" / "ages.csv").resolve()
    (folder / "dangling.csv").symlink_to(folder / "gone.csv")
    message = refused(folder, edit('"data/ages.csv"', '"dangling.csv"'))
    assert message.startswith("datasets[0].path: no such file: ")
