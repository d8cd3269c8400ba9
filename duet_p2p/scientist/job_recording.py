"""Record a job: run the scientist's function once on placeholders, offline, as a plan.

``fn``'s parameters are bound by name: each one named in ``inputs`` stands for the host's
dataset with that tag; a parameter named ``torch`` receives the remote torch namespace
(``torch.nn.Linear(64, 10)``, ``torch.optim.Adam(...)``: built in the host's process when
the job runs). Nothing is sent while recording: the recorded steps become the job's
program, checked against the host's allowlist when the host reviews it.
"""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from duet_p2p.allowlist import DEFAULT_ALLOWLIST
from duet_p2p.errors import OperationNotAllowed
from duet_p2p.identity import Identity
from duet_p2p.offline.spec import JobSpec, SignedJob
from duet_p2p.rpc.messages import to_wire
from duet_p2p.rpc.plan_spec import MAX_STEPS
from duet_p2p.scientist import plans
from duet_p2p.scientist.pointer import Pointer, TensorPointer
from duet_p2p.scientist.remote_torch import RemoteNamespace
from duet_p2p.scientist.session import ScientistCore

__all__ = ["DEFAULT_MAX_RESULT_BYTES", "JobRecorder", "build_job", "record_program"]

TORCH_PARAMETER = "torch"
DEFAULT_MAX_SECONDS = 600.0
DEFAULT_DEADLINE_SECONDS = 7 * 86400.0
DEFAULT_MAX_RESULT_BYTES = 64 << 20
DEFAULT_MAX_RESULT_ELEMENTS = 16 << 20


class JobRecorder:
    """Enough of a scientist session to record ops: nothing is sent anywhere."""

    def __init__(self, allowlist: Mapping[str, str] | None = None) -> None:
        self._allowlist = dict(allowlist) if allowlist is not None else {
            entry.path: str(entry.returns) for entry in DEFAULT_ALLOWLIST}  # fmt: skip

    allowed = ScientistCore.allowed
    allowed_paths = ScientistCore.allowed_paths
    run = ScientistCore.run
    no_grad = ScientistCore.no_grad

    def _queue(self, action: Any) -> None:
        raise OperationNotAllowed("a job's function may only use the pointers it is given "
                                  "(and the remote torch namespace)")  # fmt: skip

    def release(self, object_id: str) -> None:
        """Placeholders are never hosted: nothing to free."""


def record_program(
    fn: Callable[..., Any],
    inputs: Mapping[str, str],
    *,
    allowlist: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Record ``fn``: (the program, program input ID -> dataset tag)."""
    if not callable(fn):
        raise TypeError("a job runs a function")
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError('inputs maps the function\'s parameters to dataset tags: '
                        '{"images": "train_images", ...}')  # fmt: skip
    recorder = JobRecorder(allowlist)
    parameters = list(inspect.signature(fn).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY) for p in parameters):
        raise TypeError("a job's function takes a fixed list of named parameters")
    names = [p.name for p in parameters]
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise TypeError(f"inputs names {', '.join(unknown)}, not parameters of {fn.__name__}")
    arguments: list[Any] = []
    placeholders: list[TensorPointer] = []
    binding: dict[str, str] = {}
    for name in names:
        if name in inputs:
            tag = inputs[name]
            if not isinstance(tag, str) or not tag:
                raise TypeError(f"inputs[{name!r}] is a dataset tag (text)")
            pointer = TensorPointer(recorder, uuid.uuid4().hex, expression=name,  # type: ignore[arg-type]
                                    kind="tensor", owned=False)  # fmt: skip
            placeholders.append(pointer)
            binding[pointer.id] = tag
            arguments.append(pointer)
        elif name == TORCH_PARAMETER:
            arguments.append(RemoteNamespace(recorder))  # type: ignore[arg-type]
        else:
            raise TypeError(f"parameter {name} of {fn.__name__} is not bound: name it in "
                            "inputs (a dataset tag), or call it torch")  # fmt: skip
    with plans.recording() as record:
        returned = fn(*arguments)
    outputs = returned if isinstance(returned, tuple) else (returned,)
    if returned is None or not outputs:
        raise TypeError("a job's function returns what it computed (a pointer or a tuple)")
    if not all(isinstance(p, Pointer) for p in outputs):
        raise TypeError("a job's function returns pointers (one, or a tuple of them)")
    if not record.actions:
        raise OperationNotAllowed(f"{fn.__name__} ran no remote ops; nothing to record")
    if len(record.actions) > MAX_STEPS:
        raise OperationNotAllowed(f"{fn.__name__} has {len(record.actions)} ops; at most "
                                  f"{MAX_STEPS}")  # fmt: skip
    name = getattr(fn, "__name__", "job")
    program = {
        "name": name if name.isidentifier() else "job",
        "inputs": [p.id for p in placeholders],
        "outputs": [p.id for p in outputs],
        "steps": [to_wire(action) for action in record.actions],
    }
    return program, binding


def build_job(
    identity: Identity,
    host_id: str,
    fn: Callable[..., Any],
    *,
    inputs: Mapping[str, str],
    outputs: Sequence[str] | str,
    reason: str,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    deadline: float | None = None,
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    max_result_elements: int = DEFAULT_MAX_RESULT_ELEMENTS,
    allowlist: Mapping[str, str] | None = None,
) -> SignedJob:
    """Record ``fn`` and sign the job with ``identity``. ``outputs``: a name for each value
    ``fn`` returns, in order; ``deadline``: a time (``time.time()`` scale) by which the
    job must be done (default: a week from now)."""
    program, binding = record_program(fn, inputs, allowlist=allowlist)
    names = [outputs] if isinstance(outputs, str) else list(outputs)
    if len(names) != len(program["outputs"]):
        raise TypeError(f"{fn.__name__} returns {len(program['outputs'])} value(s): give as "
                        f"many output names, not {len(names)}")  # fmt: skip
    now = time.time()
    spec = JobSpec.new(
        client_id=identity.id, host_id=host_id, program=program, inputs=binding,
        outputs=names, reason=reason, max_seconds=float(max_seconds),
        max_result_elements=max_result_elements, max_result_bytes=max_result_bytes,
        deadline=float(now + DEFAULT_DEADLINE_SECONDS if deadline is None else deadline),
        created_at=now,
    )  # fmt: skip
    return spec.sign(identity)
