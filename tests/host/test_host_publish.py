"""A host lists what it hosts on an OpenGrid registry: schema inferred from tensors,
DataFrames and modules, an honest policy summary, edits on re-publish, signed deletions,
heartbeats that show it online, and a registry outage the host rides out.

The registry is the real one (``registry_server.app.start_registry``) on 127.0.0.1 with a
SQLite file in the test's directory; hosts use duet_p2p's background loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import duet_p2p as sy
from duet_p2p.errors import ConfigurationError, DuetError
from duet_p2p.host.config import RegistryOptions, parse_config
from duet_p2p.host.host import Host
from duet_p2p.host.jobs import JobSettings
from duet_p2p.host.launch import new_host
from duet_p2p.host.publish import (
    PublishError,
    describe,
    find_hosted,
    frame_schema,
    metric_entries,
    policy_summary,
)
from duet_p2p.host.registry_link import LISTINGS_FILE, ListingStore, _delay
from duet_p2p.identity import Identity
from duet_p2p.permissions.ledger import open_ledger
from duet_p2p.registry.client import RegistryClient, RegistryError
from duet_p2p.registry.listing import ListingSpec
from duet_p2p.registry.results import _evidence
from duet_p2p.runtime import get_runtime
from registry_server.app import RunningRegistry, start_registry
from registry_server.keys import RegistrySettings
from tests.conftest import wait_for

WAIT = 15.0
RUNTIME = get_runtime()
DEAD_SIGNALING = "http://127.0.0.1:9"
"""A signaling URL for hosts that never start (nothing listens on port 9)."""


# -- helpers shared with test_host_inbox and test_registry_e2e ------------------------------


@contextlib.contextmanager
def running_registry(folder: Path, port: int = 0) -> Iterator[RunningRegistry]:
    """A registry on 127.0.0.1 with its SQLite file in ``folder`` (limits raised for tests)."""
    settings = RegistrySettings(
        database_url=f"sqlite:///{folder / 'registry.db'}", requests_per_second=1000.0,
        burst=5000, writes_per_minute=100_000.0,
    )  # fmt: skip
    registry = RUNTIME.run(start_registry(settings, port=port), timeout=30)
    try:
        yield registry
    finally:
        RUNTIME.run(registry.close(), timeout=30)


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


@contextlib.contextmanager
def quiet_host(tmp: Path, **options: Any) -> Iterator[Host]:
    """A host that is built but never started (publishing works; loops never run)."""
    options.setdefault("admit", "any")
    host = new_host(DEAD_SIGNALING, name="lab", data_dir=private_dir(tmp / "home"), **options)
    try:
        yield host
    finally:
        host.close()


@contextlib.contextmanager
def serving_host(url: str, tmp: Path, registry: RegistryOptions, **options: Any) -> Iterator[Host]:
    """A started host (on the signaling server at ``url``) using ``registry``."""
    options.setdefault("admit", "any")
    home = private_dir(tmp / "home")
    host = RUNTIME.run(sy.launch_host_async(url, name="lab", data_dir=home, **options), timeout=90)
    host.registry.configure(registry)
    try:
        yield host
    finally:
        host.close()


def registry_get(url: str, listing_id: str) -> Any:
    async def get() -> Any:
        async with RegistryClient(url, timeout=10) as client:
            return await client.get(listing_id)

    return RUNTIME.run(get(), timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- schema inference -----------------------------------------------------------------------


def test_a_tensor_is_described_by_its_dtype_and_shape(tmp_path: Path) -> None:
    with quiet_host(tmp_path) as host:
        sent = host.send(torch.zeros(4, 3, dtype=torch.float32), tags=["ages", "demo"],
                         description="ages\nby ward")  # fmt: skip
        record = find_hosted(host, "ages")
        assert find_hosted(host, "demo") is record and find_hosted(host, sent) is record
        found = describe(record)
        assert found.kind == "dataset" and found.modality == "other"
        assert found.schema == [{"name": "ages", "dtype": "float32", "shape": [4, 3],
                                 "description": "ages by ward"}]  # fmt: skip
        assert found.approx_size == {"rows": 4, "bytes": 48}
        host.send(torch.zeros(5, dtype=torch.int64), tags=["counts"])
        assert describe(find_hosted(host, "counts")).schema[0]["dtype"] == "int64"
        host.send(torch.zeros(2, dtype=torch.complex64), tags=["waves"])
        with pytest.raises(PublishError, match="complex64"):
            describe(find_hosted(host, "waves"))


def test_a_dataframe_is_described_column_by_column() -> None:
    frame = pd.DataFrame({
        "i64": np.arange(3, dtype=np.int64), "i32": np.arange(3, dtype=np.int32),
        "u16": np.arange(3, dtype=np.uint16), "f32": np.zeros(3, dtype=np.float32),
        "flag": [True, False, True], "ward": pd.Categorical(["a", "b", "a"]),
        "when": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"]),
        "name": ["x", "y", "z"], "nullable": pd.array([1, None, 3], dtype="Int64"),
        "text": pd.array(["p", "q", None], dtype="string"),
    })  # fmt: skip
    assert {e["name"]: e["dtype"] for e in frame_schema(frame)} == {
        "i64": "int64", "i32": "int32", "u16": "int64", "f32": "float32", "flag": "bool",
        "ward": "category", "when": "datetime", "name": "string", "nullable": "int64",
        "text": "string",
    }  # fmt: skip
    assert all("shape" not in e for e in frame_schema(frame))


def test_a_hosted_dataframe_is_found_and_listed_as_a_table(tmp_path: Path) -> None:
    frame = pd.DataFrame({"age": np.array([30, 40, 50], dtype=np.int32),
                          "ward": pd.Categorical(["a", "b", "a"]), "smoker": [True, False, True]})  # fmt: skip
    with quiet_host(tmp_path) as host:
        host.send(frame, tags=["patients"])
        record = find_hosted(host, frame)
        by_frame = describe(record, frame)
        assert by_frame.modality == "tabular" and by_frame.approx_size["rows"] == 3
        assert [(e["name"], e["dtype"]) for e in by_frame.schema] == [
            ("age", "int32"), ("ward", "category"), ("smoker", "bool")]  # fmt: skip
        by_tag = describe(find_hosted(host, "patients"))  # as hosted: float64 codes
        assert [(e["name"], e["dtype"]) for e in by_tag.schema] == [
            ("age", "float64"), ("ward", "category"), ("smoker", "float64")]  # fmt: skip
        with pytest.raises(PublishError, match="nothing"):
            find_hosted(host, frame.iloc[:2])


def test_a_module_is_a_model_with_its_architecture_and_no_weights(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(0.123456)
    with quiet_host(tmp_path) as host:
        host.send(model, tags=["mlp"])
        found = describe(find_hosted(host, model))
    assert found.kind == "model" and found.schema == []
    arch = found.architecture
    assert arch is not None and arch["type"] == "Sequential" and arch["parameters"] == 10
    linear = arch["children"]["0"]
    assert linear["type"] == "Linear" and linear["args"]["in_features"] == 4
    assert linear["state"]["weight"] == {"dtype": "float32", "shape": [2, 4]}
    assert "0.123456" not in json.dumps(arch)  # shapes, never values
    assert found.approx_size == {"bytes": 40}


def test_metrics_are_self_reported_or_carry_this_hosts_receipt() -> None:
    me = Identity.generate().id
    assert metric_entries({"accuracy": 0.9}, me) == [{"name": "accuracy", "value": 0.9}]
    entries = metric_entries([{"name": "f1", "value": torch.tensor(0.5), "dataset": "a" * 32}], me)
    assert entries == [{"name": "f1", "value": 0.5, "dataset": "a" * 32}]
    with pytest.raises(PublishError, match="receipt"):
        metric_entries([{"name": "acc", "value": 1.0, "receipt": b"not a receipt"}], me)
    with pytest.raises(PublishError, match="receipt"):
        metric_entries([{"name": "acc", "value": 1.0, "receipt": "text"}], me)
    with pytest.raises(PublishError, match="at most"):
        metric_entries({f"m{i}": 1.0 for i in range(51)}, me)


def test_a_model_lists_metrics_backed_by_this_hosts_job_receipt(tmp_path: Path) -> None:
    from duet_p2p.offline.receipt import Receipt
    from tests.offline.test_receipt import HOST, issue

    receipt = issue()
    model = torch.nn.Linear(3, 1)
    with running_registry(tmp_path) as registry, quiet_host(tmp_path, identity=HOST) as host:
        host.send(model, tags=["regressor"])
        host.send(torch.ones(3), tags=["test_set"])
        data = host.publish("test_set", registry_url=registry.url, name="Test set",
                            license="MIT")  # fmt: skip
        listing = host.publish(
            model, registry_url=registry.url, name="Regressor", license="Apache-2.0",
            metrics=[{"name": "mse", "value": 0.25, "dataset": data.id, "receipt": receipt},
                     {"name": "r2", "value": 0.9}],
        )  # fmt: skip
        found = registry_get(registry.url, listing.id)
        spec = found.spec
        assert spec.kind == "model" and spec.architecture["type"] == "Linear"
        evidence = [row[-1] for row in found.metrics.rows]  # checked on the scientist's side
        assert evidence[0].startswith(f"job {receipt.job_id} on this host released")
        assert evidence[0].endswith("(receipt verified)") and evidence[1] == "self-reported"
        # a listing whose receipt is another host's says so (a hostile host may sign one)
        other = _evidence({"receipt": receipt.to_wire()}, Identity.generate().id)
        assert other.startswith("receipt does not verify: the receipt is from host")
        backed, claimed = spec.metrics
        assert Receipt.from_wire(backed["receipt"]) == receipt and backed["dataset"] == data.id
        assert claimed == {"name": "r2", "value": 0.9}
        with pytest.raises(PublishError, match="not one of this host's"):
            metric_entries([{"name": "mse", "value": 1.0, "receipt": receipt}],
                           Identity.generate().id)  # fmt: skip
        with pytest.raises(PublishError, match="unpublish it first"):
            host.publish("test_set", registry_url=registry.url, name="T", license="MIT",
                         kind="model")  # fmt: skip


def test_publish_refuses_what_is_not_hosted_or_not_describable(tmp_path: Path) -> None:
    with running_registry(tmp_path) as registry, quiet_host(tmp_path) as host:
        host.send(torch.ones(3), tags=["ones"])
        host.send(torch.ones(2))  # no name
        with pytest.raises(PublishError, match="hosts nothing"):
            host.publish("missing", registry_url=registry.url, name="M", license="MIT")
        with pytest.raises(PublishError, match="hosts nothing"):
            host.publish(torch.ones(3), registry_url=registry.url, name="M", license="MIT")
        with pytest.raises(PublishError, match="needs a name"):
            host.publish(host.owner.store.owner_records()[1].value, registry_url=registry.url,
                         name="M", license="MIT")  # fmt: skip
        with pytest.raises(DuetError, match="license"):
            host.publish("ones", registry_url=registry.url, name="M", license="not a license")
        with pytest.raises(PublishError, match="only a model"):
            host.publish("ones", registry_url=registry.url, name="M", license="MIT",
                         metrics={"acc": 1.0})  # fmt: skip
        with pytest.raises(PublishError, match="tabular"):
            host.publish("ones", registry_url=registry.url, name="M", license="MIT",
                         modality="tabular")  # fmt: skip
        with pytest.raises(TypeError):
            host.publish("ones", registry_url=registry.url, name="M", license="MIT", colour=1)
        assert sy.registry.search("", registry_url=registry.url).total == 0
        assert len(host.listings) == 0


# -- the policy summary -----------------------------------------------------------------------


def test_the_policy_summary_says_what_is_decided_without_the_owner(tmp_path: Path) -> None:
    with quiet_host(tmp_path, admit="ask", min_aggregation=5,
                    jobs=JobSettings(enabled=False)) as host:  # fmt: skip
        host.send(torch.ones(10), tags=["ages"])
        host.send(torch.ones(10), tags=["other"])
        host.owner.requests.add_handler("accept", name="sums", tags=["ages"], op="sum",
                                        max_elements=10, max_requests=100, dp=False)  # fmt: skip
        host.owner.requests.add_handler("deny", name="not that", tags=["other"], reason="no")
        host.owner._ledger = open_ledger(tmp_path / "ledger.sqlite")
        host.dp.set_budget("ages", 1.0)
        host.dp.set_total_budget("ages", 10.0, 1e-6)
        text = policy_summary(host, find_hosted(host, "ages"))
        assert "admits each new scientist" in text
        assert "exact 'sum' results of at most 10 elements are released automatically" in text
        assert "up to 100 times" in text and "Anything else waits for the owner" in text
        assert "not that" not in text and "refused" not in text  # another dataset's rule
        assert "Rules release only values that summarise at least 5 records" in text
        assert "each scientist epsilon 1 on 'ages'" in text
        assert "all scientists together epsilon 10, delta 1e-06 on 'ages'" in text
        assert "Offline jobs" not in text
        other = policy_summary(host, find_hosted(host, "other"))
        assert "are refused" in other and "budgets" not in other


def test_the_policy_summary_covers_jobs_and_can_be_overridden(tmp_path: Path) -> None:
    from duet_p2p.offline.policy import JobPolicy, ReleaseRule

    policy = JobPolicy(approve_clients=frozenset({"a" * 32}), max_seconds=60,
                       release=(ReleaseRule(outputs=frozenset({"mean"}), max_elements=1),))  # fmt: skip
    with (
        running_registry(tmp_path) as registry,
        quiet_host(tmp_path, jobs=JobSettings(policy=policy, mailbox=False)) as host,
    ):
        host.send(torch.ones(3), tags=["ages"])
        text = policy_summary(host, find_hosted(host, "ages"))
        assert "Any scientist may connect" in text
        assert "run without review: jobs of 1 named scientist(s), asking for at most 60 s" in text
        assert "released automatically: mean of at most 1 elements" in text
        listing = host.publish("ages", registry_url=registry.url, name="Ages", license="MIT")
        assert listing.spec.access_modes == ["live", "offline_jobs"]
        assert listing.spec.policy_summary == text
        again = host.publish("ages", registry_url=registry.url, name="Ages", license="MIT",
                             policy_summary="Ask us first.")  # fmt: skip
        assert again.spec.policy_summary == "Ask us first."


# -- publishing, editing, deleting ---------------------------------------------------------------


def test_publish_edit_and_unpublish_against_a_real_registry(tmp_path: Path) -> None:
    with running_registry(tmp_path) as registry:
        with quiet_host(tmp_path, jobs=JobSettings(enabled=False)) as host:
            host.send(torch.arange(12.0).reshape(4, 3), tags=["ages"])
            first = host.publish(
                "ages", registry_url=registry.url + "/", name="Ages", license="CC-BY-4.0",
                summary="Made-up ages", description="# Ages\n\nSynthetic.", tags=["health"],
                creators=["Ada"], availability=[{"days": ["mon"], "start": "09:00",
                                                 "end": "17:00", "tz": "Europe/Paris"}],
            )  # fmt: skip
            spec = first.spec
            assert (spec.version, spec.host_id, spec.kind) == (1, host.id, "dataset")
            assert spec.signaling_url == DEAD_SIGNALING and spec.access_modes == ["live"]
            assert spec.keywords == ["health"] and spec.creators == [{"name": "Ada"}]
            assert spec.schema == [{"name": "ages", "dtype": "float32", "shape": [4, 3]}]
            second = host.publish("ages", registry_url=registry.url, name="Ages (v2)",
                                  license="CC-BY-4.0")  # fmt: skip
            assert second.id == first.id and second.version == 2
            stored = registry_get(registry.url, first.id)
            assert stored.version == 2 and stored.name == "Ages (v2)"
            assert stored.spec.created_at == spec.created_at
            rows = [(r.tag, r.listing_id, r.version, r.name, r.registry) for r in host.listings]
            assert rows == [("ages", first.id, 2, "Ages (v2)", registry.url)]
            assert "Ages (v2)" in str(host.listings)
        # a restarted host remembers: the next publish is version 3 of the same listing
        with quiet_host(tmp_path, jobs=JobSettings(enabled=False)) as host:
            host.send(torch.arange(12.0).reshape(4, 3), tags=["ages"])
            assert [r.version for r in host.listings] == [2]
            third = host.publish("ages", registry_url=registry.url, name="Ages", license="MIT")
            assert (third.id, third.version) == (first.id, 3)
            assert host.unpublish("ages") == [first.id]
            with pytest.raises(RegistryError) as gone:
                registry_get(registry.url, first.id)
            assert (gone.value.status, gone.value.code) == (410, "deleted")
            assert len(host.listings) == 0
            with pytest.raises(PublishError, match="nothing"):
                host.unpublish("ages")
            fresh = host.publish("ages", registry_url=registry.url, name="Ages", license="MIT")
            assert fresh.id != first.id and fresh.version == 1


def test_publishing_by_default_registry_and_refusals(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("DUET_REGISTRY_URL", raising=False)
    with running_registry(tmp_path) as registry, quiet_host(tmp_path) as host:
        host.send(torch.ones(3), tags=["ones"])
        with pytest.raises(ConfigurationError, match="no registry"):
            host.publish("ones", name="Ones", license="MIT")
        monkeypatch.setenv("DUET_REGISTRY_URL", "ftp://127.0.0.1/")
        with pytest.raises(ConfigurationError, match="DUET_REGISTRY_URL"):
            host.publish("ones", name="Ones", license="MIT")
        monkeypatch.setenv("DUET_REGISTRY_URL", registry.url)
        listing = host.publish("ones", name="Ones", license="MIT")
        host.registry.configure(RegistryOptions(url="http://127.0.0.1:9"))  # the config wins
        with pytest.raises(RegistryError, match="cannot reach"):
            host.publish("ones", name="Ones", license="MIT")
        assert [r.version for r in host.listings] == [1]  # a failed edit changes nothing
        assert host.unpublish("ones", registry_url=registry.url) == [listing.id]


def test_the_listings_file_is_private_and_a_tampered_row_is_skipped(tmp_path: Path) -> None:
    with running_registry(tmp_path) as registry, quiet_host(tmp_path) as host:
        host.send(torch.ones(3), tags=["ones"])
        host.send(torch.zeros(3), tags=["zeros"])
        host.publish("ones", registry_url=registry.url, name="Ones", license="MIT")
        host.publish("zeros", registry_url=registry.url, name="Zeros", license="MIT")
        path = host.host_dir / LISTINGS_FILE
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        other = Identity.generate()
        forged = ListingSpec.new(other, kind="dataset", name="Zeros", summary="", description="",
                                 license="MIT", signaling_url=DEAD_SIGNALING).sign(other)  # fmt: skip
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE listings SET wire = ? WHERE tag = 'zeros'", (forged.to_wire(),))
        assert [r.tag for r in host.listings] == ["ones"]
        store = ListingStore.open(host.host_dir, host.id)
        try:
            assert [r.tag for r in store.all()] == ["ones"]
        finally:
            store.close()


# -- heartbeats and outages ---------------------------------------------------------------------


def test_heartbeats_show_the_listing_online_and_an_outage_never_stops_the_host(
    signaling_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    options = RegistryOptions(heartbeat_seconds=0.2, inbox_seconds=0.2)
    with serving_host(signaling_url, tmp_path, options, jobs=JobSettings(enabled=False)) as host:
        assert not host.registry.running  # nothing published: no loop, no registry contacted
        host.send(torch.ones(3), tags=["ones"])
        host.owner.requests.add_handler("accept", name="sums", tags=["ones"], op="sum")
        with running_registry(tmp_path, port=port) as registry:
            listing = host.publish("ones", registry_url=registry.url, name="Ones", license="MIT")
            assert host.registry.running
            assert wait_for(lambda: registry_get(registry.url, listing.id).online, WAIT)
            assert registry.url in host.registry.last_heartbeat
        caplog.set_level(logging.WARNING, logger="duet_p2p.host.registry_link")
        assert wait_for(lambda: "retrying with back-off" in caplog.text, WAIT)
        assert host.online and host.registry.running
        failing = host.registry.status
        assert wait_for(lambda: {k.split()[0] for k in failing()["failing"]} == {"heartbeat",
                                                                                  "inbox"}, WAIT)  # fmt: skip
        view = host.inbox  # the last read inbox, with a note that the registry is down
        assert view.note is not None and "Could not read" in view.note and len(view) == 0
        duet = sy.join_duet(host.id, signaling_url, identity=Identity.generate(), timeout=WAIT)
        try:  # the host still serves scientists
            assert float(duet.store["ones"].sum().get(timeout_secs=WAIT)) == 3.0
        finally:
            duet.close()
        with running_registry(tmp_path, port=port) as registry:  # back, same database
            caplog.set_level(logging.INFO, logger="duet_p2p.host.registry_link")
            assert wait_for(lambda: registry_get(registry.url, listing.id).online, 3 * WAIT)
            assert wait_for(lambda: "works again" in caplog.text, WAIT)


def test_retries_back_off_up_to_the_interval() -> None:
    assert _delay(120.0, 0) == 120.0
    assert [_delay(120.0, n) for n in range(1, 8)] == [5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 120.0]
    assert _delay(0.2, 3) == 0.2
    assert _delay(60.0, 10_000) == 60.0


# -- [registry] in host.toml --------------------------------------------------------------------


def _config(tmp_path: Path, registry: str) -> Any:
    import tomllib

    data = tomllib.loads('[host]\nsignaling_url = "http://127.0.0.1:8765"\n' + registry)
    return parse_config(data, tmp_path / "host.toml")


def test_the_registry_table_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DUET_REGISTRY_URL", raising=False)
    default = _config(tmp_path, "").registry
    assert default == RegistryOptions() and default.heartbeat_seconds == 120.0
    assert default.inbox_seconds == 60.0 and default.url is None
    given = _config(tmp_path, '[registry]\nurl = "http://127.0.0.1:8780/registry/"\n'
                    "heartbeat_seconds = 30\ninbox_seconds = 5.5\n").registry  # fmt: skip
    assert given == RegistryOptions("http://127.0.0.1:8780/registry", 30.0, 5.5)
    assert given.resolved_url() == "http://127.0.0.1:8780/registry"
    assert given.resolved_url("http://127.0.0.1:1/") == "http://127.0.0.1:1"
    monkeypatch.setenv("DUET_REGISTRY_URL", "http://127.0.0.1:2")
    assert default.resolved_url() == "http://127.0.0.1:2"
    for bad, where in [
        ('url = "ftp://127.0.0.1"', "registry.url"),
        ('url = "http://user:pw@127.0.0.1"', "registry.url"),
        ('url = "http://127.0.0.1/?q=1"', "registry.url"),
        ("url = 5", "registry.url"),
        ("heartbeat_seconds = 0", "registry.heartbeat_seconds"),
        ("heartbeat_seconds = true", "registry.heartbeat_seconds"),
        ("inbox_seconds = 1e9", "registry.inbox_seconds"),
        ("inbox_seconds = nan", "registry.inbox_seconds"),
        ("colour = 1", "registry.colour"),
    ]:
        with pytest.raises(ConfigurationError, match=where.replace(".", r"\.")):
            _config(tmp_path, f"[registry]\n{bad}\n")
    with pytest.raises(ConfigurationError, match="heartbeat_seconds"):
        RegistryOptions(heartbeat_seconds=-1)
    with pytest.raises(ConfigurationError, match="url"):
        RegistryOptions(url="http://127.0.0.1/" + "x" * 600)


def test_the_example_host_toml_documents_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from duet_p2p.host.config import load_config

    example = Path(__file__).resolve().parents[2] / "examples" / "host" / "host.toml"
    text = example.read_text()
    assert "[registry]" in text and "duet-host publish" in text
    monkeypatch.setattr("duet_p2p.host.config._dataset", lambda t, base: _stub_dataset(t))
    config = load_config(example)
    assert config.registry.heartbeat_seconds == 120.0 and config.registry.inbox_seconds == 60.0


def _stub_dataset(t: Any) -> Any:
    from duet_p2p.host.config import DatasetSpec

    return DatasetSpec(name=t.data["name"], path=Path("/dev/null"), format="csv",
                       tags=tuple(t.data.get("tags", ())))  # fmt: skip


def test_duet_host_commands_stay_torch_free() -> None:
    import subprocess
    import sys

    code = ("import sys, duet_p2p.host.cli, duet_p2p.host.config, duet_p2p.host.control; "
            "assert 'torch' not in sys.modules, 'torch was imported'")  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
