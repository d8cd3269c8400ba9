"""One exception tree for everything duet_p2p raises: catch exactly what you mean."""

from __future__ import annotations


class DuetError(Exception):
    """Root of every error raised by duet_p2p."""


class ConfigurationError(DuetError):
    """A setting (argument or environment variable) is malformed."""


class SignalingError(DuetError):
    """The signaling server refused a request or could not be reached."""


class SignalingNotFound(SignalingError):
    """The Duet ID is unknown to the signaling server (never posted, or expired)."""


class DuetConnectionError(DuetError):
    """The peer-to-peer connection could not be made or was lost."""


class ConnectionTimeout(DuetConnectionError):
    """The data channel did not open in time."""


class PeerClosed(DuetConnectionError):
    """The peer closed the connection, or stopped answering heartbeats."""


class PeerVerificationError(DuetError):
    """The peer's certificate does not match the ID exchanged out of band."""


class ProtocolError(DuetError):
    """A message from the peer was malformed, oversize or not understood."""


class ValueTooLarge(ProtocolError):
    """The owner sent a value larger than the get's ``max_bytes``; it was dropped unused."""


class RemoteError(DuetError):
    """An operation failed on the owner's side; carries the op and the error type only."""

    def __init__(self, message: str, *, op: str | None = None, error_type: str | None = None):
        super().__init__(message)
        self.op = op
        self.error_type = error_type


class OperationNotAllowed(DuetError):
    """The operation is not on the allowlist (refused before execution)."""


class PermissionDenied(DuetError):
    """The owner (or an owner's policy) denied the request."""

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


class InvalidQuery(DuetError, ValueError):
    """A differentially private query does not fit the dataset's public schema or its own
    rules (a missing bound, an unknown column); refused before it ran, at no cost."""


class BudgetExceeded(DuetError):
    """A differentially private query would spend more privacy budget than is left; refused
    before it ran. ``dataset`` and ``remaining_epsilon`` say which budget and what is left."""

    def __init__(
        self, message: str, *, dataset: str | None = None, remaining_epsilon: float | None = None
    ):
        super().__init__(message)
        self.dataset = dataset
        self.remaining_epsilon = remaining_epsilon


class RequestTimeout(DuetError):
    """No decision on a request arrived in time."""


class PrivateValueError(DuetError):
    """Something would reveal private data (a length, a shape) without a release."""


__all__ = [
    "BudgetExceeded",
    "InvalidQuery",
    "ConfigurationError",
    "ConnectionTimeout",
    "DuetConnectionError",
    "DuetError",
    "OperationNotAllowed",
    "PeerClosed",
    "PeerVerificationError",
    "PermissionDenied",
    "PrivateValueError",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "SignalingError",
    "SignalingNotFound",
]
