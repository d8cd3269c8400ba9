"""Integrity: the owner's data can no longer be changed by anything the scientist sends.

``nn.Dropout(p=1, inplace=True)(input=data)`` used to zero the owner's tensor (keyword
arguments were not shielded), and calling an owner-hosted ``Embedding(max_norm)``
rewrote it. Hosted tensors now live in sealed memory that workers map read-only; the
monitor refuses writes into groups that hold them, and the worker copies what an in-place
layer is handed.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import duet_p2p as sy
from tests.hostile.common import WAIT, assert_serving, host, session

SECRET = torch.arange(1.0, 9.0).reshape(4, 2)


def _worker_copy(owner: sy.Duet, pointer: sy.Pointer) -> torch.Tensor:
    """The worker's view of a hosted tensor, released by the owner (to check it)."""
    handle = pointer.clone().request(reason="check")
    owner.requests.wait(WAIT).accept()  # type: ignore[union-attr]
    return handle.result(timeout=WAIT)


def test_inplace_layers_by_keyword_cannot_write(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        data = host(owner, scientist, SECRET.clone(), "data")
        for layer in (nn.Dropout(p=1.0, inplace=True), nn.ReLU(inplace=True)):
            remote = layer.send(scientist)
            remote(input=data - 100.0)  # a copy: harmless
            remote(input=data)
            remote(data)
        scientist.torch.nn.functional.dropout(data, p=1.0, training=True, inplace=False)
        refused = scientist.torch.nn.functional.relu(data, inplace=True)
        with pytest.raises(sy.OperationNotAllowed, match="modify an object the owner hosts"):
            refused.get(timeout_secs=WAIT)
        assert torch.equal(_worker_copy(owner, data), SECRET)
        assert_serving(owner, scientist)


def test_owner_modules_that_change_when_called_are_refused(
    signaling_url: str, tmp_path: Path
) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        embedding = nn.Embedding(10, 3, max_norm=0.5)
        before = embedding.weight.detach().clone()
        owner.store.send(embedding, tags=["embedding"])
        remote = scientist.store.refresh()["embedding"]
        called = remote(scientist.torch.tensor([1, 2, 3]))
        with pytest.raises(sy.OperationNotAllowed, match="changes itself"):
            called.get(timeout_secs=WAIT)
        wrapped = scientist.torch.nn.Sequential(remote)(scientist.torch.tensor([1]))
        with pytest.raises(sy.OperationNotAllowed):
            wrapped.get(timeout_secs=WAIT)
        assert torch.equal(embedding.weight.detach(), before)
        assert_serving(owner, scientist)


def test_writes_into_hosted_data_are_refused(signaling_url: str, tmp_path: Path) -> None:
    with session(signaling_url, tmp_path) as (owner, scientist):
        data = host(owner, scientist, SECRET.clone(), "data")
        attempts = [
            data.add_(1), data[0].mul_(0), data.view(8).zero_(), data.t().t().fill_(3),
            data.data.copy_(scientist.torch.zeros(4, 2)), data.detach().add_(1),
            data.float().sub_(1), data.reshape(8).clamp_(0, 1),
            scientist.torch.nn.init.zeros_(data),
        ]  # fmt: skip
        data[0] = 0.0  # __setitem__ on the hosted tensor
        for pointer in attempts:
            with pytest.raises(sy.OperationNotAllowed, match="modify an object the owner hosts"):
                pointer.get(timeout_secs=WAIT)
        assert torch.equal(_worker_copy(owner, data), SECRET)
        assert_serving(owner, scientist)


def test_hosted_memory_is_sealed_against_writes(signaling_url: str, tmp_path: Path) -> None:
    """Even a worker running arbitrary code could not change the shared bytes."""
    with session(signaling_url, tmp_path) as (owner, scientist):
        host(owner, scientist, SECRET.clone(), "data")
        [sealed] = owner._core._sealed.values()
        seals = fcntl.fcntl(sealed.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
        writable = os.open(f"/proc/self/fd/{sealed.fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.write(writable, b"\x00" * 8)
            with pytest.raises(PermissionError):
                mmap.mmap(writable, sealed.nbytes, flags=mmap.MAP_SHARED)
        finally:
            os.close(writable)
