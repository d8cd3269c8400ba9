"""One thread that writes a standing host's journal, committing what queued up together.

Sessions hand it their journal writes (a kept value, a decision, a delivery) in order; the
thread runs everything waiting in one transaction, so eight busy scientists cost one sync
where they would cost eight, and the event loop that serves them never waits on a disk.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
MAX_BATCH = 256
"""Writes committed together at most."""
_STOP = object()


class JournalWriter:
    """Runs journal writes in submission order on its own thread, batched into
    transactions with ``transaction()`` (a context manager the journal provides)."""

    def __init__(self, transaction: Callable[[], Any]) -> None:
        self._transaction = transaction
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="duet-journal", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> (
        concurrent.futures.Future[Any]
    ):  # fmt: skip
        """Queue ``function(*args, **kwargs)``; the future settles once it is committed."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # a waiter giving up cannot cancel the write
        if self._closed:
            future.set_exception(RuntimeError("the journal is closed"))
            return future
        self._queue.put((function, args, kwargs, future))
        return future

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # never expected; say so rather than stop silently
            log.exception("the journal writer stopped")
            raise

    def _serve(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            self._commit([item for item in batch if item is not _STOP])
            if stop:
                return

    def _commit(self, batch: list[Any]) -> None:
        if not batch:
            return
        outcomes: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
        try:
            with self._transaction():
                for function, args, kwargs, future in batch:
                    try:
                        outcomes.append((future, function(*args, **kwargs), None))
                    except Exception as exc:  # noqa: BLE001 - one bad write fails alone
                        outcomes.append((future, None, exc))
        except Exception as exc:  # noqa: BLE001 - the commit itself failed: all of them did
            log.exception("committing %d journal writes failed", len(batch))
            outcomes = [(item[3], None, exc) for item in batch]
        for future, result, error in outcomes:
            if future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
