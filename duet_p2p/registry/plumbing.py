"""What the registry client and the objects it returns share, below both of them.

:class:`RegistryError`, the synchronous runner, the scientist's default identity, and how
a :class:`~duet_p2p.registry.results.Listing` (or a page, or a session) opens a client to
act again: :mod:`duet_p2p.registry.client` registers its ``RegistryClient`` here when it
is imported, which it always is before any such object exists.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from duet_p2p.errors import DuetError

if TYPE_CHECKING:
    from duet_p2p.identity import Identity

__all__ = ["DEFAULT_TIMEOUT", "MAX_OFFSET", "RegistryError", "open_client", "register_client",
           "resolve_identity", "run_sync"]  # fmt: skip

T = TypeVar("T")
DEFAULT_TIMEOUT = 15.0
MAX_OFFSET = 10_000
"""The furthest a page of results or reviews may start (a registry's own cap)."""

_client_factory: Callable[[str | None, float], Any] | None = None


class RegistryError(DuetError):
    """A registry refused a request, could not be reached in time, or sent an answer that
    is malformed, oversize or does not verify. ``code`` is the registry's error code (or
    ``"unreachable"``, ``"timeout"``, ``"malformed"``, ``"too_large"``, ``"forged"``,
    ``"rolled_back"``, ``"equivocation"``, ``"deleted"``) and ``status`` the HTTP status, if
    any."""

    def __init__(self, message: str, *, code: str = "error", status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.details: dict[str, Any] = {}
        """The registry's JSON error object, when it sent one."""


def register_client(factory: Callable[[str | None, float], Any]) -> None:
    """Name the client class results open (``factory(registry_url, timeout)``)."""
    global _client_factory
    _client_factory = factory


def open_client(url: str | None, timeout: float) -> Any:
    """A new ``RegistryClient`` for ``url`` (use it as ``async with``)."""
    if _client_factory is None:
        raise RuntimeError("duet_p2p.registry.client is not imported")
    return _client_factory(url, timeout)


def resolve_identity(identity: Identity | str | None) -> Identity:
    """An Identity, or the persistent one of that name (default ``"default"``: the one
    ``sy.join_duet`` and ``sy.submit_job`` sign with)."""
    from duet_p2p.identity import Identity

    if isinstance(identity, Identity):
        return identity
    return Identity.load(identity or "default")


def run_sync(coro: Coroutine[Any, Any, T], timeout: float = DEFAULT_TIMEOUT) -> T:
    """Run ``coro`` on duet_p2p's background loop and wait (notebook-safe); ``timeout``
    is the per-request timeout, the wait allows a few requests."""
    from duet_p2p.runtime import get_runtime

    return get_runtime().run(coro, 3 * timeout + 5.0)
