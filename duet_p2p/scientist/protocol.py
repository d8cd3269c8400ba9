"""What the scientist's pointers, plans, store and DP views use of the session.

The session (``scientist.session.ScientistCore``) implements it; the modules below it
depend on this protocol only, so nothing in the scientist's package imports upwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, Protocol

from duet_p2p.allowlist import AllowedOp


class SessionCore(Protocol):
    max_get_bytes: int
    store_version: int

    def sync(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any: ...

    def run(
        self,
        op: str,
        *,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: str | None = None,
    ) -> Any: ...

    def allowed(self, path: str) -> AllowedOp | None: ...

    def allowed_paths(self, prefix: str) -> list[str]: ...

    def no_grad(self) -> contextlib.AbstractContextManager[None]: ...

    def release(self, object_id: str) -> None: ...

    def pointer_for(self, entry: dict[str, Any]) -> Any: ...

    async def request(
        self, object_id: str, reason: str, *, delete: bool = False, max_bytes: int | None = None
    ) -> Any: ...

    async def cancel(self, request_id: str) -> None: ...

    def decision_future(
        self, request_id: str, max_bytes: int | None = None
    ) -> asyncio.Future[Any]: ...

    async def store_list(self) -> list[dict[str, Any]]: ...

    async def dp_query(self, dataset_id: str, query: Any, reason: str, handle: type) -> Any: ...

    async def dp_budget(self) -> Any: ...

    async def my_requests(self) -> Any: ...

    async def fetch_release(
        self, request_id: str, max_bytes: int | None = None, timeout: float | None = None
    ) -> Any: ...
