"""Private data and its metadata stay on the owner's side unless the owner releases them."""

from __future__ import annotations

import re

import pytest
import torch

import duet_p2p as sy
from tests.conftest import wait_for

Pair = tuple[sy.Duet, sy.Duet]
WAIT = 10.0
# Distinctive values and a distinctive shape, so any leak is recognisable in text.
SECRET = torch.full((7, 13), 4242.5)
SECRET_MARKERS = (r"4242", r"\b7\s*[,x]\s*13\b", r"\b91\b")
_IDS = re.compile(r"\b[0-9a-f]{8}(?:[0-9a-f]{24})?\b")


def assert_no_secret(text: str) -> None:
    """No value, shape or element count of SECRET in ``text`` (object IDs aside)."""
    text = _IDS.sub("<id>", text)
    for marker in SECRET_MARKERS:
        assert not re.search(marker, text), f"{marker!r} leaked in {text!r}"


def hosted(duet_pair: Pair, **options: object) -> sy.Pointer:
    owner, scientist = duet_pair
    owner.store.send(SECRET.clone(), tags=["secret"], description="a private table", **options)
    return scientist.store.refresh()["secret"]


def test_local_builtins_never_reveal_private_data(duet_pair: Pair) -> None:
    secret = hosted(duet_pair)
    derived = (secret * 2).sum(dim=0)
    for pointer in (secret, derived):
        with pytest.raises(sy.PrivateValueError) as length:
            len(pointer)
        with pytest.raises(sy.PrivateValueError):
            iter(pointer)
        with pytest.raises(sy.PrivateValueError):
            list(pointer)
        with pytest.raises(sy.PrivateValueError):
            bool(pointer)
        with pytest.raises(sy.PrivateValueError):
            range(10)[pointer]
        with pytest.raises(sy.PrivateValueError):
            if pointer:  # noqa: SIM102 - exercising __bool__ the way users hit it
                pass
        for text in (repr(pointer), str(pointer), f"{pointer}", str(length.value)):
            assert_no_secret(text)
        assert re.fullmatch(r"<TensorPointer .+ id=[0-9a-f]{8}>", repr(pointer))
    assert repr(derived).startswith("<TensorPointer (secret * 2).sum(dim=0) id=")


def test_shape_and_size_are_pointers(duet_pair: Pair) -> None:
    owner, _ = duet_pair
    secret = hosted(duet_pair)
    for meta in (secret.shape, secret.size(), secret.numel(), secret.dim()):
        assert isinstance(meta, sy.Pointer), f"{meta!r} is a local value"
        assert_no_secret(repr(meta))
    handle = secret.shape.request(reason="to size my model")
    assert handle.wait(0.3) == "pending", "the shape of private data needs the owner's approval"
    assert owner.requests[0].name == "shape"
    owner.requests[0].accept()
    assert tuple(handle.result(timeout=WAIT)) == (7, 13)


def test_listing_hides_private_metadata_unless_the_owner_shows_it(duet_pair: Pair) -> None:
    owner, scientist = duet_pair
    owner.store.send(SECRET.clone(), tags=["hidden"])
    owner.store.send(SECRET.clone(), tags=["shown"], show_metadata=True)
    owner.store.send(SECRET.clone(), tags=["public"], public=True)
    entries = {e["tags"][0]: e for e in scientist._core.sync(scientist._core.store_list())}

    assert "shape" not in entries["hidden"] and "dtype" not in entries["hidden"]
    assert entries["shown"]["shape"] == [7, 13] and entries["shown"]["dtype"] == "float32"
    assert entries["public"]["shape"] == [7, 13]
    for entry in entries.values():
        assert_no_secret(str({k: v for k, v in entry.items() if k != "shape"}))
    assert entries["hidden"]["public"] is False and entries["public"]["public"] is True

    listing = str(scientist.store.refresh())
    [hidden_row] = [line for line in listing.splitlines() if "[hidden]" in line]
    [shown_row] = [line for line in listing.splitlines() if "[shown]" in line]
    assert_no_secret(hidden_row)
    assert "(7, 13) float32" in shown_row


def test_failed_ops_on_private_data_reveal_nothing_before_release(duet_pair: Pair) -> None:
    """Whether a computation on private data failed is private: it becomes a request like
    any value; the owner sees the error, the scientist learns of it only if released."""
    owner, scientist = duet_pair
    secret = hosted(duet_pair)
    failing = {
        "view": secret.view(5),  # torch: shape '[5]' is invalid for input of size 91
        "matmul": secret @ torch.ones(3, 2),  # torch: shapes cannot be multiplied (7x13 and 3x2)
        "index": secret[100],  # torch: index 100 is out of bounds ... with size 7
        "repeat": secret.repeat(100_000, 100_000),  # over the owner's element cap
    }
    fine = secret.sum()
    handles = {name: pointer.request(reason=name) for name, pointer in failing.items()}
    handles["fine"] = fine.request(reason="fine")
    assert wait_for(lambda: sum(r.ready for r in owner.requests.all()) == 5, WAIT)
    requests = {r.reason: r for r in owner.requests.all()}
    assert requests["fine"].error is None
    for name in failing:
        assert requests[name].error, f"the owner sees why {name} failed"
        assert requests[name].status.value == "pending"
    requests["view"].deny("no")
    with pytest.raises(sy.PermissionDenied):
        handles["view"].result(timeout=WAIT)
    for name in ("matmul", "index", "repeat"):
        requests[name].accept()
        with pytest.raises(sy.DuetError) as caught:  # RemoteError, or the owner's refusal
            handles[name].result(timeout=WAIT)
        assert not isinstance(caught.value, sy.PermissionDenied)
        assert "withheld" in str(caught.value)
        assert_no_secret(str(caught.value))

    # The same mistakes on public data keep their details: the test can see a leak.
    owner.store.send(SECRET.clone(), tags=["open"], public=True)
    with pytest.raises(sy.RemoteError, match="91"):
        scientist.store.refresh()["open"].view(5).get(timeout_secs=WAIT)
