"""One background event-loop thread that owns all network I/O, and a sync bridge to it.

The synchronous API submits coroutines here and waits on a concurrent future, so it works
from any thread, including one that already runs an event loop (Jupyter).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from duet_p2p.errors import DuetError

log = logging.getLogger(__name__)
T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _new_executor() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(thread_name_prefix="duet-p2p-worker")


class Runtime:
    """A daemon thread running an event loop, with closers run before it stops."""

    def __init__(self) -> None:
        self._loop = _new_loop()
        self._ready = threading.Event()
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._executor = _new_executor()
        self._loop.set_default_executor(self._executor)
        self._thread = threading.Thread(target=self._main, name="duet-p2p-io", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self._stopped = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; returns a thread-safe future."""
        if self._stopped:
            coro.close()
            raise DuetError("duet_p2p's runtime has shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result; Ctrl-C cancels it."""
        if self.in_loop_thread():
            coro.close()
            raise DuetError(
                "a blocking duet_p2p call was made from duet_p2p's own event loop; "
                "use the async API (await ...) inside callbacks"
            )
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise
        except KeyboardInterrupt:
            future.cancel()
            raise

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self._loop.call_soon_threadsafe(callback, *args)

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Register an async close function run at shutdown (interpreter exit)."""
        self._closers.append(closer)

    def remove_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        if closer in self._closers:
            self._closers.remove(closer)
        if not self._closers:
            self.release_threads()

    def release_threads(self) -> None:
        """Let the loop's idle worker threads (``asyncio.to_thread``) end, e.g. once no
        session is open; new ones start on demand."""
        if not self._stopped:
            self._loop.call_soon_threadsafe(self._replace_executor)

    def _replace_executor(self) -> None:
        old, self._executor = self._executor, _new_executor()
        self._loop.set_default_executor(self._executor)
        old.shutdown(wait=False)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Run registered closers, cancel what is left, stop the loop and join the thread."""
        if self._stopped:
            return
        try:
            future = asyncio.run_coroutine_threadsafe(self._close_all(), self._loop)
            future.result(timeout)
        except Exception:  # noqa: BLE001 - shutdown must not raise at interpreter exit
            log.debug("closing at shutdown failed", exc_info=True)
        self._stopped = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    async def _close_all(self) -> None:
        closers, self._closers = list(self._closers), []
        for closer in reversed(closers):
            try:
                await asyncio.wait_for(closer(), 3.0)
            except Exception:  # noqa: BLE001
                log.debug("closer failed at shutdown", exc_info=True)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process-wide runtime, started on first use."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime._stopped:
            _runtime = Runtime()
            atexit.register(_runtime.shutdown)
        return _runtime
