"""An owner publishes a sample with a listing: a synthetic one goes out signed and comes
back to the scientist exactly; one that copies records of the hosted data (``df.head()``,
a slice of a tensor, a row with a missing value, a category row) is refused unless the
owner says the data is public; a sample that does not fit the schema is refused. The
website shows the sample, escaped."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from duet_p2p.host.jobs import JobSettings
from duet_p2p.host.publish import PublishError
from duet_p2p.host.publish_sample import TextTable, copied_record, sample_values
from tests.host.test_host_publish import quiet_host, registry_get, running_registry

PATIENTS = pd.DataFrame({
    "age": [34.0, 51.0, np.nan, 67.0], "ward": pd.Categorical(["north", "south", "north", "east"]),
    "smoker": [True, False, True, False],
})  # fmt: skip
SYNTHETIC = pd.DataFrame({"age": [40.0, 41.0], "ward": ["north", "west"], "smoker": [False, True]})
XSS = '<img src=x onerror="window.__pwned=1">'


def publish(host: object, url: str, obj: object, **options: object) -> object:
    return host.publish(obj, registry_url=url, name="Patients", license="CC0-1.0",  # type: ignore[attr-defined]
                        **options)  # fmt: skip


def test_a_synthetic_sample_is_published_and_read_back(tmp_path: Path) -> None:
    with (
        running_registry(tmp_path) as registry,
        quiet_host(tmp_path, jobs=JobSettings(enabled=False)) as host,
    ):
        host.send(PATIENTS, tags=["patients"])
        listing = publish(host, registry.url, PATIENTS, sample=SYNTHETIC)
        found = registry_get(registry.url, listing.id)  # type: ignore[attr-defined]
        assert found.has_sample
        frame = found.sample()
        assert frame["ward"].tolist() == ["north", "west"]
        assert frame["age"].tolist() == [40.0, 41.0] and frame["smoker"].tolist() == [False, True]
        # the page shows it, escaped
        odd = SYNTHETIC.assign(ward=["north", XSS])
        publish(host, registry.url, PATIENTS, sample=odd)
        with urllib.request.urlopen(f"{registry.url}/listings/{listing.id}", timeout=10) as page:  # noqa: S310 - loopback
            html = page.read().decode()
        assert "Sample from the owner" in html and "2 record(s)" in html
        assert "&lt;img src=x onerror=" in html and "<img src=x" not in html
        # an edit without a sample takes it away
        publish(host, registry.url, PATIENTS)
        assert not registry_get(registry.url, listing.id).has_sample  # type: ignore[attr-defined]


def test_a_sample_that_copies_the_hosted_data_is_refused(tmp_path: Path) -> None:
    with (
        running_registry(tmp_path) as registry,
        quiet_host(tmp_path, jobs=JobSettings(enabled=False)) as host,
    ):
        host.send(PATIENTS, tags=["patients"])
        for sample in (
            PATIENTS.head(2),  # the slip this guards against
            PATIENTS.iloc[[2]],  # a row with a missing value is still that row
            pd.concat([SYNTHETIC, PATIENTS.iloc[[3]]]),  # one copied row among synthetic ones
            {"age": [67], "ward": ["east"], "smoker": [False]},  # typed in by hand
        ):
            with pytest.raises(PublishError, match="is a record of the hosted data"):
                publish(host, registry.url, PATIENTS, sample=sample)
        assert len(host.listings) == 0  # nothing was published
        # the owner may say the data is public
        listing = publish(host, registry.url, PATIENTS, sample=PATIENTS.head(2),
                          sample_copies_data=True)  # fmt: skip
        assert registry_get(registry.url, listing.id).sample()["age"].tolist() == [34.0, 51.0]  # type: ignore[attr-defined]
        # a close but different row is not a copy (the guard catches slips, not intent)
        publish(host, registry.url, PATIENTS, sample={"age": [67.5], "ward": ["east"],
                                                        "smoker": [False]})  # fmt: skip


def test_a_tensor_sample_that_copies_a_slice_is_refused(tmp_path: Path) -> None:
    images = torch.arange(24, dtype=torch.uint8).reshape(4, 2, 3)
    with (
        running_registry(tmp_path) as registry,
        quiet_host(tmp_path, jobs=JobSettings(enabled=False)) as host,
    ):
        host.send(images, tags=["images"])
        with pytest.raises(PublishError, match="record 1 of the sample"):
            publish(host, registry.url, "images", sample=torch.stack([images[0] + 100, images[3]]))
        listing = publish(host, registry.url, "images", sample=images[:2] + 100)
        got = registry_get(registry.url, listing.id).sample()  # type: ignore[attr-defined]
        assert torch.equal(got["images"], images[:2] + 100)


def test_a_sample_that_does_not_fit_the_schema_is_refused(tmp_path: Path) -> None:
    with quiet_host(tmp_path, jobs=JobSettings(enabled=False)) as host:
        host.send(PATIENTS, tags=["patients"])
        host.send(torch.zeros(4, 3), tags=["grid"])
        url = "http://127.0.0.1:9"  # never reached: the sample is refused first
        refusals = [
            (PATIENTS, SYNTHETIC.drop(columns="smoker"), "missing"),
            (PATIENTS, SYNTHETIC.assign(age=["old", "young"]), "finite numbers"),
            ("patients", SYNTHETIC, "holds finite numbers that fit float64"),  # as hosted: codes
            (PATIENTS, "not a sample", "DataFrame, a tensor"),
            ("grid", torch.zeros(2, 4), "size 4 in dimension 1"),
            ("grid", torch.full((1, 3), float("nan")), "finite"),
            ("grid", torch.zeros(5, 3), "1 to 4 records"),
        ]
        for hosted, sample, why in refusals:
            with pytest.raises(PublishError, match=why):
                publish(host, url, hosted, sample=sample)


def test_copies_are_found_by_value_in_large_data_chunk_by_chunk() -> None:
    from duet_p2p.host import publish_sample
    from duet_p2p.store import StoredObject

    held = torch.arange(200_000 * 3, dtype=torch.float32).reshape(200_000, 3)
    record = StoredObject(id="x" * 32, value=held, origin="owner", tags=("big",))
    schema = [{"name": "big", "dtype": "float32", "shape": [200_000, 3]}]
    last = held[-1].tolist()
    assert publish_sample.CHUNK_ROWS < 200_000
    assert copied_record(sample_values({"big": [[0.5, 1, 2], last]}, schema), schema, record) == 1
    assert copied_record({"big": [[0.5, 1, 2]]}, schema, record) is None


def test_duet_host_publish_takes_a_sample_from_a_csv_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.host.test_host_inbox import cli, control

    with (
        running_registry(tmp_path) as registry,
        quiet_host(tmp_path, jobs=JobSettings(enabled=False)) as host,
        control(host, tmp_path / "ctl") as sock,
    ):
        host.send(PATIENTS, tags=["patients"])  # as hosted: age and smoker float64, ward codes
        base = ["publish", "patients", "--name", "Patients", "--license", "CC0-1.0",
                "--registry", registry.url, "--socket", str(sock)]  # fmt: skip
        made_up = tmp_path / "made_up.csv"
        made_up.write_text('age,ward,smoker\r\n40,north,0\r\n,"we,st",1\r\n', encoding="utf-8")
        code, out, err = cli(capsys, *base, "--sample-file", str(made_up))
        assert code == 0, err
        (row,) = host.listings
        assert row.signed.spec.sample == {"age": [40, None], "ward": ["north", "we,st"],
                                          "smoker": [0, 1]}  # fmt: skip
        copied = tmp_path / "copied.csv"
        copied.write_text("ward,age,smoker\nsouth,51,0\n")  # a hosted row, columns reordered
        code, _, err = cli(capsys, *base, "--sample-file", str(copied))
        assert code == 1 and "is a record of the hosted data" in err
        for text, why in (
            ("age,ward,smoker\nold,north,0\n", "holds float values, not 'old'"),
            ("age,ward\n40,north\n", "missing"),
            ("age,ward,smoker,extra\n40,north,0,1\n", "'extra' is not in the schema"),
            ("age,ward,smoker\n40,north\n", "line 2 of"),
            ("age,ward,smoker\n", "at least one row"),
            ("age,ward,smoker\n" + "40,north,0\n" * 101, "more than 100 rows"),
            ("age,ward,smoker\n40,no\x1brth,0\n", "control or invisible"),
        ):
            bad = tmp_path / "bad.csv"
            bad.write_text(text)
            code, _, err = cli(capsys, *base, "--sample-file", str(bad))
            assert code == 1 and why in err, (text, err)
        assert host.listings[0].version == 1  # nothing else was published


def test_a_sample_that_cannot_be_lined_up_with_the_data_is_refused_unless_vouched_for(
    tmp_path: Path,
) -> None:
    with quiet_host(tmp_path, jobs=JobSettings(enabled=False)) as host:
        host.send(PATIENTS, tags=["patients"])
        host.send(torch.zeros(4, 3), tags=["grid"])
        renamed = [{"name": "years", "dtype": "float64"}, {"name": "ward", "dtype": "category"}]
        three_columns = [{"name": n, "dtype": "float32"} for n in ("a", "b", "c")]
        for hosted, schema, sample, why in (
            ("patients", renamed, {"years": [40.0], "ward": ["north"]}, "no column 'years'"),
            ("grid", three_columns[:2], {"a": [1.0], "b": [2.0]}, "2 columns, the hosted tensor 3"),
        ):
            with pytest.raises(PublishError, match=f"cannot be checked.*{why}"):
                publish(host, "http://127.0.0.1:9", hosted, schema=schema, sample=sample)
        with running_registry(tmp_path) as registry:
            listing = publish(host, registry.url, "patients", schema=renamed,
                              sample={"years": [40.0], "ward": ["north"]},
                              sample_copies_data=True)  # fmt: skip
            assert registry_get(registry.url, listing.id).sample()["years"].tolist() == [40.0]  # type: ignore[attr-defined]
            # columns laid over a plain tensor are compared in order
            with pytest.raises(PublishError, match="is a record of the hosted data"):
                publish(host, registry.url, "grid", schema=three_columns,
                        sample={"a": [0.0], "b": [0.0], "c": [0.0]})  # fmt: skip


def test_csv_cells_are_trimmed_of_spaces() -> None:
    schema = [{"name": "n", "dtype": "int64"}, {"name": "d", "dtype": "date"},
              {"name": "w", "dtype": "category"}]  # fmt: skip
    table = TextTable(["n", "d", "w"], [["1", " 2024-01-02", " north "], [" ", "", "south"]])
    assert sample_values(table, schema) == {"n": [1, None], "d": ["2024-01-02", None],
                                            "w": ["north", "south"]}  # fmt: skip
