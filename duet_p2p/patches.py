"""``tensor.tag(...)``, ``tensor.describe(...)`` and ``obj.send(duet)``, as in the seed flow.

Added to torch.Tensor and torch.nn.Module on import of duet_p2p (only names torch lacks).
"""

from __future__ import annotations

from typing import Any

import torch

from duet_p2p.store import clean_tags


def _tag(self: Any, *tags: str) -> Any:
    """Attach tags (searchable labels) to this object before sending it; returns it."""
    self._duet_tags = clean_tags((*getattr(self, "_duet_tags", ()), *tags))
    return self


def _describe(self: Any, description: str) -> Any:
    """Attach a description shown in the store listing; returns the object."""
    if not isinstance(description, str):
        raise TypeError("a description is a string")
    self._duet_description = description
    return self


def _send(self: Any, duet: Any, searchable: bool = True, **options: Any) -> Any:
    """Owner: host this object in ``duet``'s store. Scientist: place it in the owner's
    process and return its pointer."""
    if getattr(duet, "role", None) == "owner":
        return duet.send(self, searchable=searchable, **options)
    return duet.send(self)


def install() -> None:
    """Add the methods where torch has none of that name (idempotent)."""
    for cls in (torch.Tensor, torch.nn.Module):
        for name, function in (("tag", _tag), ("describe", _describe), ("send", _send)):
            existing = getattr(cls, name, None)
            if existing is None or getattr(existing, "__module__", "") == __name__:
                setattr(cls, name, function)
