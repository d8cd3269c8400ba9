"""Errors as they cross the wire: a code, the exception type's name and a safe message."""

from __future__ import annotations

from typing import Any

from duet_p2p import errors
from duet_p2p.text import printable

_BY_CODE: dict[str, type[errors.DuetError]] = {
    "not_allowed": errors.OperationNotAllowed,
    "remote_error": errors.RemoteError,
    "protocol": errors.ProtocolError,
    "permission_denied": errors.PermissionDenied,
    "request_timeout": errors.RequestTimeout,
    "private": errors.PrivateValueError,
    "not_found": errors.RemoteError,
    "budget_exceeded": errors.BudgetExceeded,
    "invalid_query": errors.InvalidQuery,
}
_CODE_OF: dict[type[BaseException], str] = {
    errors.BudgetExceeded: "budget_exceeded",
    errors.InvalidQuery: "invalid_query",
    errors.OperationNotAllowed: "not_allowed",
    errors.ProtocolError: "protocol",
    errors.PermissionDenied: "permission_denied",
    errors.RequestTimeout: "request_timeout",
    errors.PrivateValueError: "private",
}
MAX_MESSAGE_CHARS = 500


def error_info(
    exc: BaseException, *, op: str | None = None, safe_message: str | None = None
) -> dict[str, Any]:
    """A wire description of ``exc``. Use ``safe_message`` when the text could hold data."""
    code = next((c for t, c in _CODE_OF.items() if isinstance(exc, t)), "remote_error")
    message = safe_message if safe_message is not None else str(exc)
    info: dict[str, Any] = {
        "code": code,
        "type": type(exc).__name__,
        "message": message[:MAX_MESSAGE_CHARS],
    }
    if op is not None:
        info["op"] = op
    if isinstance(exc, errors.BudgetExceeded):
        info["dataset"] = exc.dataset
        info["remaining_epsilon"] = exc.remaining_epsilon
    return info


def raise_from_info(info: Any) -> None:
    """Raise the local exception that ``info`` (from the peer) describes."""
    if not isinstance(info, dict):
        raise errors.ProtocolError("the peer sent a malformed error")
    code = str(info.get("code", "remote_error"))[:64]
    message = str(info.get("message", "the peer reported an error"))[:MAX_MESSAGE_CHARS]
    op = info.get("op") if isinstance(info.get("op"), str) else None
    error_type = str(info.get("type", ""))[:64] or None
    cls = _BY_CODE.get(code, errors.RemoteError)
    if cls is errors.RemoteError:
        prefix = f"{op} failed on the owner's side" if op else "failed on the owner's side"
        kind = f" ({error_type})" if error_type else ""
        raise errors.RemoteError(f"{prefix}{kind}: {message}", op=op, error_type=error_type)
    if cls is errors.BudgetExceeded:
        dataset = info.get("dataset")
        remaining = info.get("remaining_epsilon")
        raise errors.BudgetExceeded(
            message,
            dataset=printable(dataset, 100) if isinstance(dataset, str) else None,
            remaining_epsilon=float(remaining)
            if isinstance(remaining, (int, float)) and not isinstance(remaining, bool)
            else None,
        )
    if cls is errors.PermissionDenied:
        raise errors.PermissionDenied(message, reason=info.get("reason"))
    raise cls(message)
