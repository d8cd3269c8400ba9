"""Forge offline jobs for the red-team tests: programs written by hand, fields a real
scientist's client would never set, and documents signed over bytes the spec refuses."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from duet_p2p.identity import Identity
from duet_p2p.offline import spec as job_spec
from duet_p2p.offline.spec import JobSpec, SignedJob
from duet_p2p.rpc.codec import ObjectRef

__all__ = ["fields", "forge_wire", "new_id", "program", "signed_job", "step"]


def new_id() -> str:
    return os.urandom(16).hex()


def step(op: str, result: str, target: object = None, *args: object, **kwargs: object) -> dict:
    """One program step in its wire form (``target``: an ID string becomes a reference)."""
    ref = ObjectRef(target) if isinstance(target, str) else target
    return {"op": op, "result": result, "target": ref, "args": list(args), "kwargs": kwargs,
            "no_grad": False}  # fmt: skip


def program(inputs: list[str], outputs: list[str], steps: list[dict], name: str = "p") -> dict:
    return {"name": name, "inputs": inputs, "outputs": outputs, "steps": steps}


def fields(identity: Identity, host_id: str, prog: dict, inputs: dict[str, str],
           outputs: dict[str, str], **overrides: Any) -> dict[str, Any]:  # fmt: skip
    now = time.time()
    values: dict[str, Any] = dict(
        job_id=new_id(), client_id=identity.id, host_id=host_id, program=prog, inputs=inputs,
        outputs=outputs, reason="a forged job", max_seconds=30.0, max_result_elements=1 << 20,
        max_result_bytes=1 << 20, deadline=now + 3600.0, created_at=now,
        nonce=os.urandom(16),
    )  # fmt: skip
    values.update(overrides)
    return values


def signed_job(identity: Identity, host_id: str, prog: dict, inputs: dict[str, str],
               outputs: dict[str, str], **overrides: Any) -> SignedJob:  # fmt: skip
    """A valid job (the spec's checks hold), signed by ``identity``."""
    return JobSpec(**fields(identity, host_id, prog, inputs, outputs, **overrides)).sign(identity)


def forge_wire(identity: Identity, values: dict[str, Any]) -> bytes:
    """A job's wire form over ``values`` as given (no spec check), signed by ``identity``."""
    body = job_spec.canonical_bytes({"v": 1, **values})
    message = job_spec.signed_message(job_spec.CONTEXT, hashlib.sha256(body).digest())
    return job_spec.pack_envelope(body, identity.public_key, identity.sign_bytes(message))
