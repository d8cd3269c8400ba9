"""The scientist's view of the store: a table of what the owner hosts, never the values."""

from __future__ import annotations

import re

import pytest
import torch

import duet_p2p as sy
from duet_p2p.scientist.pointer import Pointer
from tests.conftest import wait_for

TIMEOUT = 10.0
UID = r"<UID:[0-9a-f]{32}>"


def _host_seed_data(owner: sy.Duet) -> None:
    """Step 3 of the seed flow, as written."""
    data = torch.tensor([[0, 0], [0, 1]]).tag("data")
    target = torch.tensor([[0], [0]]).tag("target")
    data.send(owner, searchable=True)
    target.send(owner, searchable=True)


def test_seed_flow_listing(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    """Step 4: the store is a table with ID and Tags; store[0] and store["data"] agree."""
    owner, scientist = duet_pair
    _host_seed_data(owner)

    text = repr(scientist.store)
    lines = text.splitlines()
    header = lines[0].split()
    assert header[:2] == ["ID", "Tags"]
    assert re.match(rf"^0\s+{UID}\s+\[data\]", lines[1]), text
    assert re.match(rf"^1\s+{UID}\s+\[target\]", lines[2]), text
    assert len(lines) == 3
    assert str(scientist.store) == text

    data_ptr = scientist.store[0]
    target_ptr = scientist.store[1]
    assert isinstance(data_ptr, Pointer) and isinstance(target_ptr, Pointer)
    assert scientist.store["data"].id == data_ptr.id
    assert scientist.store["target"].id == target_ptr.id
    assert data_ptr.id in lines[1] and target_ptr.id in lines[2]
    assert scientist.store[data_ptr.id].id == data_ptr.id  # by ID as well
    assert scientist.store[-1].id == target_ptr.id


def test_len_iteration_and_pandas(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    owner, scientist = duet_pair
    _host_seed_data(owner)
    assert len(scientist.store) == 2
    pointers = list(scientist.store)
    assert [p.id for p in pointers] == [scientist.store[0].id, scientist.store[1].id]
    assert all(isinstance(p, Pointer) for p in pointers)

    frame = scientist.store.pandas
    assert list(frame.columns[:2]) == ["ID", "Tags"]
    assert len(frame) == 2
    assert frame["ID"][0] == f"<UID:{pointers[0].id}>"
    assert list(frame["Tags"][1]) == ["target"]


def test_empty_store(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    _, scientist = duet_pair
    assert len(scientist.store) == 0
    assert list(scientist.store) == []
    assert "empty" in repr(scientist.store).lower()
    with pytest.raises(IndexError, match="no index 0"):
        scientist.store[0]
    with pytest.raises(KeyError):
        scientist.store["data"]


def test_tag_lookup_errors(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    owner, scientist = duet_pair
    first = owner.store.send(torch.ones(2), tags=["twin", "a"])
    second = owner.store.send(torch.zeros(2), tags=["twin", "b"])
    with pytest.raises(KeyError) as ambiguous:
        scientist.store["twin"]
    message = str(ambiguous.value)
    assert "2 objects are tagged 'twin'" in message
    assert first.id[:8] in message and second.id[:8] in message
    assert "position or ID" in message
    with pytest.raises(KeyError, match="no object in the store is tagged 'absent'"):
        scientist.store["absent"]
    assert scientist.store["a"].id == first.id
    assert scientist.store["b"].id == second.id
    with pytest.raises(IndexError):
        scientist.store[2]
    with pytest.raises(TypeError):
        scientist.store[1.5]  # type: ignore[index]


def test_listing_refreshes_when_the_owner_adds_objects(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    owner, scientist = duet_pair
    owner.store.send(torch.ones(2), tags=["first"])
    assert wait_for(lambda: scientist._core.store_version >= 1)
    assert len(scientist.store) == 1
    version = scientist._core.store_version
    owner.store.send(torch.ones(3), tags=["second"])
    # the owner's StoreChanged notice makes the next look fetch the listing again
    assert wait_for(lambda: scientist._core.store_version > version)
    assert len(scientist.store) == 2
    assert scientist.store["second"].id == scientist.store[1].id
    assert "[second]" in repr(scientist.store)


def test_listing_refreshes_when_the_owner_removes_objects(
    duet_pair: tuple[sy.Duet, sy.Duet],
) -> None:
    owner, scientist = duet_pair
    kept = owner.store.send(torch.ones(2), tags=["kept"])
    gone = owner.store.send(torch.ones(2), tags=["gone"])
    # both notices have arrived, so the listing below is cached and fresh
    assert wait_for(lambda: scientist._core.store_version >= 2)
    assert len(scientist.store) == 2
    owner.store.remove(gone.id)
    assert wait_for(lambda: len(scientist.store) == 1)
    assert scientist.store[0].id == kept.id
    with pytest.raises(KeyError):
        scientist.store["gone"]


def test_unsearchable_objects_are_not_listed(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    owner, scientist = duet_pair
    hidden = owner.store.send(torch.ones(2), tags=["hidden"], searchable=False)
    torch.ones(2).tag("shown").send(owner)
    assert len(scientist.store) == 1
    assert hidden.id not in repr(scientist.store)
    with pytest.raises(KeyError):
        scientist.store["hidden"]
    assert len(owner.store) == 2  # the owner sees both


def test_description_and_metadata_choices(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    """Shape and dtype appear only for public objects or with show_metadata=True."""
    owner, scientist = duet_pair
    private = torch.zeros(17, 23, dtype=torch.float64).tag("private")
    private.describe("heart rates, per patient").send(owner)
    owner.store.send(torch.zeros(19, 29), tags=["shown"], show_metadata=True)
    owner.store.send(torch.zeros(31, dtype=torch.int16), tags=["public"], public=True)

    text = repr(scientist.store)
    # each row without its index and random ID (whose hex digits could look like a shape)
    rows = {line.split()[2]: re.sub(UID, "", line) for line in text.splitlines()[1:]}
    assert "heart rates, per patient" in rows["[private]"]
    assert "17" not in rows["[private]"] and "23" not in rows["[private]"]
    assert "float64" not in rows["[private]"]
    assert "(19, 29)" in rows["[shown]"] and "float32" in rows["[shown]"]
    assert "(31,)" in rows["[public]"] and "int16" in rows["[public]"]

    entries = scientist._core.sync(scientist._core.store_list(), timeout=TIMEOUT)
    by_tag = {e["tags"][0]: e for e in entries}
    assert "shape" not in by_tag["private"] and "dtype" not in by_tag["private"]
    assert by_tag["private"]["public"] is False
    assert by_tag["shown"]["shape"] == [19, 29]
    assert by_tag["public"]["public"] is True
    for entry in entries:
        assert "value" not in entry

    frame = scientist.store.pandas
    assert frame["Description"][0] == "heart rates, per patient"


def test_html_listing_escapes_owner_text(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    owner, scientist = duet_pair
    owner.store.send(
        torch.ones(1),
        tags=["<script>alert(1)</script>"],
        description='<img src=x onerror="alert(2)">\x1b[31mred',
    )
    html = scientist.store._repr_html_()
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;" in html and "&lt;img" in html
    assert "<th>ID</th>" in html and "<th>Tags</th>" in html
    text = repr(scientist.store)
    assert "\x1b" not in text  # no terminal escape sequences in the text form


def test_owner_objects_stay_with_the_owner(duet_pair: tuple[sy.Duet, sy.Duet]) -> None:
    """A pointer from the listing reveals nothing locally."""
    owner, scientist = duet_pair
    _host_seed_data(owner)
    pointer = scientist.store["data"]
    with pytest.raises(sy.PrivateValueError):
        len(pointer)
    with pytest.raises(sy.PrivateValueError, match="owner"):
        bool(pointer)
    assert "data" in repr(pointer)
    assert "0, 1" not in repr(pointer)
