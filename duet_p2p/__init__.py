"""duet_p2p: remote data science without access to the data.

The data owner hosts tensors; the data scientist computes on them through pointers over a
peer-to-peer WebRTC channel; nothing leaves the owner's side unless the owner approves.
"""

from duet_p2p import patches as _patches
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
from duet_p2p.host.launch import launch_host, launch_host_async
from duet_p2p.identity import Identity
from duet_p2p.limits import OwnerLimits
from duet_p2p.permissions.disclosure import DisclosureRules
from duet_p2p.permissions.ledger import PrivacyLedger
from duet_p2p.scientist.dp import DPHistogram
from duet_p2p.scientist.pointer import Pointer

_patches.install()

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_ALLOWLIST",
    "AllowedOp",
    "Allowlist",
    "BudgetExceeded",
    "ConfigurationError",
    "ConnectionTimeout",
    "DPHistogram",
    "DisclosureRules",
    "Duet",
    "Host",
    "Identity",
    "DuetConnectionError",
    "DuetError",
    "InvalidQuery",
    "OperationNotAllowed",
    "OwnerLimits",
    "PeerClosed",
    "PeerVerificationError",
    "PermissionDenied",
    "Pointer",
    "PrivacyLedger",
    "PrivateValueError",
    "ValueTooLarge",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "ReturnKind",
    "SignalingError",
    "SignalingNotFound",
    "join_duet",
    "join_duet_async",
    "launch_duet",
    "launch_duet_async",
    "launch_host",
    "launch_host_async",
]
