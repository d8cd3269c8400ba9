"""The one walker over an action's nested arguments: the object references it names."""

from __future__ import annotations

from typing import Any

from duet_p2p.rpc.codec import ObjectRef


def refs_in(*values: Any) -> list[ObjectRef]:
    """Every ObjectRef inside ``values`` (lists, tuples, dicts, slices), in order."""
    found: list[ObjectRef] = []
    for value in values:
        _walk(value, found)
    return found


def action_refs(action: Any) -> list[ObjectRef]:
    """The references of an action's receiver, arguments and keyword arguments."""
    return refs_in(action.target, action.args, action.kwargs)


# A module-level function that takes the result list: a nested recursive closure is a
# reference cycle, which left every op's garbage to the cyclic collector.
def _walk(value: Any, found: list[ObjectRef]) -> None:
    if isinstance(value, ObjectRef):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _walk(v, found)
    elif isinstance(value, slice):
        for v in (value.start, value.stop, value.step):
            _walk(v, found)
