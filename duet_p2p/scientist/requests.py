"""A request for a value the scientist asked for: its status, a wait, and the value."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from duet_p2p.errors import (
    DuetConnectionError,
    DuetError,
    PermissionDenied,
    RequestTimeout,
)
from duet_p2p.scientist.protocol import SessionCore


class RequestHandle:
    """A request for a value: poll ``status``, ``wait(timeout)``, then ``result()``."""

    def __init__(
        self, core: SessionCore, request_id: str, object_id: str, max_bytes: int | None = None
    ) -> None:
        self._core = core
        self.request_id = request_id
        self.object_id = object_id
        self.max_bytes = core.max_get_bytes if max_bytes is None else max_bytes
        """Largest encoded value this request takes."""
        # The decision may have arrived before this handle (reply and decision in one read):
        # the core keeps it until claimed here, and forgets the request once decided.
        self._future: asyncio.Future[Any] = core.decision_future(request_id, self.max_bytes)

    @property
    def status(self) -> str:
        """ "pending", "accepted", "denied", "expired" (timed out, withdrawn, or the
        connection was lost) or "failed" (the owner released an error instead of a value,
        or the value was refused here)."""
        if not self._future.done():
            return "pending"
        if self._future.cancelled():
            return "expired"
        error = self._future.exception()
        if error is None:
            return "accepted"
        if isinstance(error, PermissionDenied):
            return "denied"
        if isinstance(error, (RequestTimeout, DuetConnectionError)):
            return "expired"
        return "failed"

    def wait(self, timeout: float | None = None) -> str:
        """Block until decided or ``timeout`` seconds pass; returns the status."""
        with contextlib.suppress(RequestTimeout, DuetError):
            self._core.sync(self._wait(timeout))
        return self.status

    async def _wait(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            raise RequestTimeout(self._timeout_message(timeout)) from None

    def result(self, timeout: float | None = None) -> Any:
        """The value. Raises PermissionDenied; RemoteError if the owner released the error
        the computation failed with; ValueTooLarge; or RequestTimeout after ``timeout`` s,
        which withdraws the request."""
        return self._core.sync(self.result_async(timeout))

    async def result_async(self, timeout: float | None = None) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            await self._core.cancel(self.request_id)
            error = RequestTimeout(self._timeout_message(timeout))
            if not self._future.done():  # withdrawn: a late decision is not kept
                self._future.set_exception(error)
            raise error from None

    def _timeout_message(self, timeout: float | None) -> str:
        return (
            f"the owner did not decide on request {self.request_id} within {timeout:g} s; "
            "the request was withdrawn — ask again later or ask the owner to look at "
            "duet.requests"
        )

    def __repr__(self) -> str:
        return f"<RequestHandle {self.request_id[:8]} {self.status}>"
