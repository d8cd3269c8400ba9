"""The owner's hosted tensors as sealed memory that workers map read-only.

Each hosted tensor is copied once into a memfd, which is then sealed against writes,
growth and shrinking: no process, the workers included, can change those bytes again,
and every worker maps them without a copy of its own. Where memfds do not exist (not
Linux), the bytes travel to the worker inline and the worker holds its own copy.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_SEALS = (
    getattr(fcntl, "F_SEAL_SEAL", 1)
    | getattr(fcntl, "F_SEAL_SHRINK", 2)
    | getattr(fcntl, "F_SEAL_GROW", 4)
    | getattr(fcntl, "F_SEAL_WRITE", 8)
)


@dataclass
class SealedTensor:
    """A hosted tensor's bytes, sealed, with what a worker needs to view them."""

    fd: int
    """The sealed memfd (-1 when empty, or when memfds are unavailable)."""
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    inline: bytes | None = None
    """The bytes themselves, where no memfd could be made."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def seal(tensor: torch.Tensor) -> SealedTensor:
    """Copy ``tensor`` into sealed shared memory."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    dtype = str(flat.dtype).removeprefix("torch.")
    shape = tuple(tensor.shape)
    raw = flat.view(torch.uint8).numpy() if nbytes else np.empty(0, np.uint8)
    if not nbytes:
        return SealedTensor(-1, 0, dtype, shape)
    if not hasattr(os, "memfd_create"):
        return SealedTensor(-1, nbytes, dtype, shape, inline=raw.tobytes())
    fd = os.memfd_create("duet-hosted", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        with mmap.mmap(fd, nbytes) as mapped:
            mapped[0:nbytes] = memoryview(raw)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return SealedTensor(fd, nbytes, dtype, shape)


def read_only_view(sealed: SealedTensor) -> torch.Tensor:
    """The sealed bytes as a tensor the monitor can read (mapped read-only, no copy); the
    mapping lives as long as the tensor, even after the memfd is closed."""
    dtype = getattr(torch, sealed.dtype)
    if not sealed.nbytes:
        return torch.empty(sealed.shape, dtype=dtype)
    if sealed.inline is not None:
        buffer: Any = bytearray(sealed.inline)
    else:
        buffer = mmap.mmap(sealed.fd, sealed.nbytes, prot=mmap.PROT_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the buffer is not writable
        flat = torch.frombuffer(buffer, dtype=torch.uint8)
    return flat.view(dtype).reshape(sealed.shape)
