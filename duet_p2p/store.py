"""The owner's object store: what the owner hosts and what the peer's actions created."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from duet_p2p.schema import TableSchema

MAX_TAGS = 64
MAX_TAG_CHARS = 100
MAX_DESCRIPTION_CHARS = 4000


def new_object_id() -> str:
    """A fresh unguessable object ID (32 hex digits)."""
    return uuid.uuid4().hex


@dataclass
class StoredObject:
    """One value held in the owner's process, with what is known of where it came from."""

    id: str
    value: Any
    origin: str
    """"owner" (hosted by the owner: never freed by the peer) or "peer" (made by its actions)."""
    private: bool = True
    tags: tuple[str, ...] = ()
    description: str = ""
    searchable: bool = False
    show_metadata: bool = False
    """Whether the listing may show the shape and dtype (the owner's choice)."""
    expression: str = ""
    """Lineage rendered as an expression, e.g. ``data.sum().item()``."""
    ops: tuple[str, ...] = ()
    """Every op in the lineage, oldest first."""
    lineage_tags: frozenset[str] = frozenset()
    """Tags of the owner's objects this value derives from."""
    aggregation: float = math.inf
    """The fewest private elements each value here summarises (inf: no private data)."""
    support: float = math.inf
    """About how many distinct private elements the value can depend on (caps aggregation)."""
    error: dict[str, Any] | None = None
    """Set when the op that should have made this object failed (safe to send)."""
    nbytes: int = 0
    budget: str = "public"
    """Which of the peer's two memory budgets it counts against: results whose labels are
    private count apart, so a public op's refusal never depends on a private size."""
    schema: TableSchema | None = None
    """Column names (and categories, identifier) the owner declared; listed to scientists."""
    created_at: float = field(default_factory=time.time)

    @property
    def type_name(self) -> str:
        if isinstance(self.value, torch.Tensor):
            return "Tensor"
        return type(self.value).__name__


def value_nbytes(value: Any) -> int:
    """Bytes a value holds, counted so that nothing is free: tensors by their elements,
    Python numbers and containers by their object sizes (a ``tolist()`` of a million
    elements is tens of megabytes, not nothing)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (bool, int, float, complex)):
        return _PY_NUMBER_BYTES
    if isinstance(value, (list, tuple)):
        return _PY_CONTAINER_BYTES + sum(_PY_SLOT_BYTES + value_nbytes(v) for v in value)
    if isinstance(value, dict):
        return _PY_CONTAINER_BYTES + sum(2 * _PY_SLOT_BYTES + value_nbytes(v)
                                         for v in value.values())  # fmt: skip
    if isinstance(value, torch.nn.Module):
        return sum(value_nbytes(t) for t in value.state_dict().values())
    return 0


_PY_NUMBER_BYTES = 32
_PY_SLOT_BYTES = 8
_PY_CONTAINER_BYTES = 56


def clean_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """Validate and de-duplicate tags, keeping their order."""
    result: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not tag or len(tag) > MAX_TAG_CHARS:
            raise ValueError(f"a tag must be a non-empty string of <= {MAX_TAG_CHARS} characters")
        if tag not in result:
            result.append(tag)
    if len(result) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags per object")
    return tuple(result)


class OwnerStore:
    """Objects by ID, thread-safe; counts the bytes held for the peer."""

    def __init__(self) -> None:
        self._objects: dict[str, StoredObject] = {}
        self._lock = threading.Lock()
        self._bytes: dict[str, int] = {"public": 0, "private": 0}
        self._peer_count = 0
        self._owner_storages: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._objects)

    @property
    def peer_bytes(self) -> int:
        """Bytes held for the peer, both budgets together."""
        return sum(self._bytes.values())

    def bytes_of(self, budget: str) -> int:
        """Bytes held for the peer in one budget ("public" or "private")."""
        return self._bytes.get(budget, 0)

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._objects

    def get(self, object_id: str) -> StoredObject | None:
        return self._objects.get(object_id)

    def put(self, record: StoredObject) -> None:
        with self._lock:
            previous = self._objects.get(record.id)
            if previous is not None:
                if previous.origin == "owner":
                    raise KeyError(f"object {record.id} belongs to the owner")
                self._forget(previous)
            self._objects[record.id] = record
            if record.origin == "peer":
                self._bytes[record.budget] = self._bytes.get(record.budget, 0) + record.nbytes
                self._peer_count += 1
            else:
                self._remember_storage(record.value, +1)

    def remove_peer_objects(self, ids: Iterable[str]) -> int:
        """Free objects the peer created; IDs of owner objects are ignored. Returns count."""
        freed = 0
        with self._lock:
            for object_id in ids:
                record = self._objects.get(object_id)
                if record is not None and record.origin == "peer":
                    del self._objects[object_id]
                    self._forget(record)
                    freed += 1
        return freed

    def remove(self, object_id: str) -> StoredObject | None:
        """Remove any object (the owner's own call)."""
        with self._lock:
            record = self._objects.pop(object_id, None)
            if record is not None:
                self._forget(record)
            return record

    def _forget(self, record: StoredObject) -> None:
        if record.origin == "peer":
            self._bytes[record.budget] -= record.nbytes
            self._peer_count -= 1
        else:
            self._remember_storage(record.value, -1)

    def _remember_storage(self, value: Any, delta: int) -> None:
        for tensor in _tensors_in(value):
            key = _storage_key(tensor)
            count = self._owner_storages.get(key, 0) + delta
            if count > 0:
                self._owner_storages[key] = count
            else:
                self._owner_storages.pop(key, None)

    def shares_owner_memory(self, value: Any) -> bool:
        """Whether ``value`` is, or views, memory of an object the owner hosts."""
        return any(_storage_key(t) in self._owner_storages for t in _tensors_in(value))

    def listing(self) -> list[StoredObject]:
        """Searchable owner objects, oldest first."""
        with self._lock:
            records = [r for r in self._objects.values() if r.origin == "owner" and r.searchable]
        return sorted(records, key=lambda r: r.created_at)

    def records_holding(self, value: Any) -> list[StoredObject]:
        """Records whose value is ``value`` itself (the same Python object)."""
        with self._lock:
            return [r for r in self._objects.values() if r.value is value]

    def owner_records(self) -> list[StoredObject]:
        """Every object the owner hosts, oldest first."""
        with self._lock:
            records = [r for r in self._objects.values() if r.origin == "owner"]
        return sorted(records, key=lambda r: r.created_at)

    def peer_records(self) -> list[StoredObject]:
        with self._lock:
            return [r for r in self._objects.values() if r.origin == "peer"]

    def peer_object_count(self) -> int:
        return self._peer_count


def _tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, torch.nn.Module):
        return [*value.parameters(), *value.buffers()]
    if isinstance(value, (list, tuple)):
        return [t for v in value[:10_000] if isinstance(v, torch.Tensor) for t in [v]]
    return []


def _storage_key(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return id(tensor)
