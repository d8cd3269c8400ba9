"""duet_p2p: remote data science without access to the data.

The data owner hosts tensors; the data scientist computes on them through pointers over a
peer-to-peer WebRTC channel; nothing leaves the owner's side unless the owner approves.

The public names load on first use, so light tools (``duet-host requests``, the signaling
client) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AllowedOp": "duet_p2p.allowlist",
    "Allowlist": "duet_p2p.allowlist",
    "BudgetExceeded": "duet_p2p.errors",
    "ConfigurationError": "duet_p2p.errors",
    "ConnectionTimeout": "duet_p2p.errors",
    "DEFAULT_ALLOWLIST": "duet_p2p.allowlist",
    "DPHistogram": "duet_p2p.scientist.dp",
    "DisclosureRules": "duet_p2p.permissions.disclosure",
    "Duet": "duet_p2p.duet",
    "DuetConnectionError": "duet_p2p.errors",
    "DuetError": "duet_p2p.errors",
    "Host": "duet_p2p.host.host",
    "Identity": "duet_p2p.identity",
    "InvalidQuery": "duet_p2p.errors",
    "OperationNotAllowed": "duet_p2p.errors",
    "OwnerLimits": "duet_p2p.limits",
    "PeerClosed": "duet_p2p.errors",
    "PeerVerificationError": "duet_p2p.errors",
    "PermissionDenied": "duet_p2p.errors",
    "Pointer": "duet_p2p.scientist.pointer",
    "PrivacyLedger": "duet_p2p.permissions.ledger",
    "PrivateValueError": "duet_p2p.errors",
    "ProtocolError": "duet_p2p.errors",
    "RemoteError": "duet_p2p.errors",
    "RequestTimeout": "duet_p2p.errors",
    "ReturnKind": "duet_p2p.allowlist",
    "SignalingError": "duet_p2p.errors",
    "SignalingNotFound": "duet_p2p.errors",
    "ValueTooLarge": "duet_p2p.errors",
    "join_duet": "duet_p2p.duet",
    "join_duet_async": "duet_p2p.duet",
    "launch_duet": "duet_p2p.duet",
    "launch_duet_async": "duet_p2p.duet",
    "launch_host": "duet_p2p.host.launch",
    "launch_host_async": "duet_p2p.host.launch",
    "Job": "duet_p2p.scientist.jobs",
    "JobFailed": "duet_p2p.scientist.jobs",
    "JobSettings": "duet_p2p.host.jobs",
    "JobPolicy": "duet_p2p.offline.policy",
    "ReleaseRule": "duet_p2p.offline.policy",
    "jobs": "duet_p2p.scientist.jobs",
    "submit_job": "duet_p2p.scientist.jobs",
    "submit_job_async": "duet_p2p.scientist.jobs",
}
__all__ = [
    "AllowedOp",
    "Allowlist",
    "BudgetExceeded",
    "ConfigurationError",
    "ConnectionTimeout",
    "DEFAULT_ALLOWLIST",
    "DPHistogram",
    "DisclosureRules",
    "Duet",
    "DuetConnectionError",
    "DuetError",
    "Host",
    "Identity",
    "InvalidQuery",
    "Job",
    "JobFailed",
    "JobPolicy",
    "JobSettings",
    "OperationNotAllowed",
    "OwnerLimits",
    "PeerClosed",
    "PeerVerificationError",
    "PermissionDenied",
    "Pointer",
    "PrivacyLedger",
    "PrivateValueError",
    "ProtocolError",
    "ReleaseRule",
    "RemoteError",
    "RequestTimeout",
    "ReturnKind",
    "SignalingError",
    "SignalingNotFound",
    "ValueTooLarge",
    "jobs",
    "join_duet",
    "join_duet_async",
    "launch_duet",
    "launch_duet_async",
    "launch_host",
    "launch_host_async",
    "registry",
    "submit_job",
    "submit_job_async",
]


def __getattr__(name: str) -> Any:
    if name == "registry":  # the OpenGrid registry's client: sy.registry.search(...)
        value = importlib.import_module("duet_p2p.registry")
        globals()[name] = value
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'duet_p2p' has no attribute {name!r}")
    from duet_p2p import patches

    patches.install()  # tensor.send(duet), .tag(...), .describe(...)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


if TYPE_CHECKING:
    from duet_p2p.allowlist import DEFAULT_ALLOWLIST, AllowedOp, Allowlist, ReturnKind
    from duet_p2p.duet import Duet, join_duet, join_duet_async, launch_duet, launch_duet_async
    from duet_p2p.errors import (
        BudgetExceeded,
        ConfigurationError,
        ConnectionTimeout,
        DuetConnectionError,
        DuetError,
        InvalidQuery,
        OperationNotAllowed,
        PeerClosed,
        PeerVerificationError,
        PermissionDenied,
        PrivateValueError,
        ProtocolError,
        RemoteError,
        RequestTimeout,
        SignalingError,
        SignalingNotFound,
        ValueTooLarge,
    )
    from duet_p2p.host.host import Host
    from duet_p2p.host.jobs import JobSettings
    from duet_p2p.host.launch import launch_host, launch_host_async
    from duet_p2p.identity import Identity
    from duet_p2p.limits import OwnerLimits
    from duet_p2p.offline.policy import JobPolicy, ReleaseRule
    from duet_p2p.permissions.disclosure import DisclosureRules
    from duet_p2p.permissions.ledger import PrivacyLedger
    from duet_p2p.scientist.dp import DPHistogram
    from duet_p2p.scientist.jobs import Job, JobFailed, jobs, submit_job, submit_job_async
    from duet_p2p.scientist.pointer import Pointer
