"""Offline jobs, the scientist's side: submit now, collect the results later.

``duet.submit(fn, inputs=..., outputs=...)`` sends a job over a live connection to a
standing host; ``sy.submit_job(host_id, fn, ..., signaling_url=...)`` leaves it in the
host's end-to-end encrypted mailbox when the host is offline. Either way the job is
signed by the scientist's identity and recorded on this machine (``sy.jobs()``), and a
:class:`Job` follows it: ``status``, ``wait(timeout)``, ``result()`` (the released outputs,
checked against the host's signed receipt), ``cancel()``, ``receipt``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from duet_p2p.config import signaling_url as configured_url
from duet_p2p.errors import DuetError, PermissionDenied, RequestTimeout
from duet_p2p.identity import Identity
from duet_p2p.mailbox.client import MailboxClient
from duet_p2p.mailbox.known_keys import KeyNotPinned, KnownKeys, check_id, check_key, key_matches
from duet_p2p.offline import mail as job_mail
from duet_p2p.offline.lifecycle import JobState, parse_state
from duet_p2p.offline.receipt import Receipt
from duet_p2p.offline.results import JobUpdate, ResultBundle, open_result
from duet_p2p.offline.spec import SignedJob
from duet_p2p.rpc import codec
from duet_p2p.runtime import get_runtime
from duet_p2p.scientist.job_book import JobBook, JobRecord
from duet_p2p.scientist.job_mail import MAX_RESULT_BYTES, check_mail
from duet_p2p.scientist.job_recording import build_job
from duet_p2p.scientist.session import _interactive_stderr
from duet_p2p.table import Table, TableView, format_clock
from duet_p2p.text import printable

__all__ = ["Job", "JobFailed", "JobsList", "jobs", "submit_job", "submit_job_async"]

_S = JobState
ENDED = frozenset({_S.DELIVERED, _S.REJECTED, _S.WITHHELD, _S.FAILED, _S.TIMED_OUT,
                   _S.CANCELLED, _S.EXPIRED})  # fmt: skip
"""States after which nothing more happens to a job, as its scientist sees it."""
LIVE_POLL_SECONDS = 2.0
"""Seconds between asking a host connected live (it also says when a job changes)."""
MAIL_WAIT_SECONDS = 20.0


class JobFailed(DuetError):
    """A job ended without results: rejected, withheld, failed, timed out, cancelled or
    expired; ``state`` and ``reason`` say how and why."""

    def __init__(self, job_id: str, state: str, reason: str) -> None:
        super().__init__(f"job {job_id} ended {state}: {printable(reason, 1000)}")
        self.state = state
        self.reason = reason


class JobReceipt:
    """A job's receipt with what it is checked against: ``verify()`` holds it to the job's
    host, the job this scientist signed and the bytes received. Its fields (``job_hash``,
    ``inputs``, ``outputs``, ``submitted_at`` ... ``released_at``) read through."""

    def __init__(self, receipt: Receipt, host_id: str, signed: SignedJob,
                 outputs: Mapping[str, bytes]) -> None:  # fmt: skip
        self.receipt = receipt
        self._host_id = host_id
        self._signed = signed
        self._outputs = dict(outputs)

    def verify(self, host_id: str | None = None) -> None:
        """InvalidReceipt unless the receipt is the host's (``host_id``, default the job's),
        for this job, and attests exactly the results received."""
        self.receipt.verify(host_id or self._host_id, self._signed, self._outputs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.receipt, name)

    def __repr__(self) -> str:
        return f"<JobReceipt of job {self.receipt.job_id} by host {self.receipt.host_id}>"


class Job:
    """One of the scientist's jobs (live through ``core`` when connected, else through the
    mailbox at the job's signaling server)."""

    def __init__(self, identity: Identity, job_id: str, *, core: Any = None,
                 book: JobBook | None = None) -> None:  # fmt: skip
        self.identity = identity
        self.job_id = job_id
        self._book = book or JobBook(identity.id)
        self._core = core
        if self._book.record(job_id) is None:
            raise KeyError(f"no job {printable(job_id, 64)!r} is recorded on this machine")

    # -- what is known ------------------------------------------------------------------

    @property
    def record(self) -> JobRecord:
        found = self._book.record(self.job_id)
        assert found is not None
        return found

    @property
    def host_id(self) -> str:
        return self.record.host_id

    @property
    def status(self) -> str:
        """The job's state, asked of the host now (live, or the mailbox)."""
        self.refresh()
        return self.record.state

    @property
    def reason(self) -> str:
        """Why the job is in its state, as the host said (printable)."""
        return printable(self.record.reason, 2000)

    @property
    def progress(self) -> tuple[int, int]:
        """(steps done, steps in all) of the run, as last heard."""
        return self.record.progress

    @property
    def signed(self) -> SignedJob:
        return self._book.signed(self.job_id)

    @property
    def receipt(self) -> JobReceipt | None:
        """The host's signed receipt, once the results arrived (verified on arrival; again
        with ``job.receipt.verify()``)."""
        bundle = self._bundle()
        if bundle is None:
            return None
        return JobReceipt(Receipt.from_wire(bundle.receipt), self.host_id, self.signed,
                          bundle.outputs)  # fmt: skip

    def _bundle(self) -> ResultBundle | None:
        data = self._book.result(self.job_id)
        return None if data is None else ResultBundle.from_bytes(data, max_bytes=MAX_RESULT_BYTES)

    def _live(self) -> Any:
        core = self._core
        if core is None or core.endpoint.closed_event.is_set():
            return None
        return core

    # -- asking the host ------------------------------------------------------------------

    def refresh(self, wait: float = 0.0) -> JobRecord:
        """Ask the host (live, or read the mailbox waiting up to ``wait`` s)."""
        return get_runtime().run(self.refresh_async(wait))

    async def refresh_async(self, wait: float = 0.0) -> JobRecord:
        core = self._live()
        if core is not None:
            seen = core.job_changes
            rows = await core.list_jobs()
            for row in rows if isinstance(rows, list) else []:
                if isinstance(row, dict) and row.get("job_id") == self.job_id:
                    self._apply(row)
            released = any(isinstance(row, dict) and row.get("job_id") == self.job_id
                           and row.get("state") in (_S.RELEASED, _S.DELIVERED)
                           for row in (rows if isinstance(rows, list) else []))  # fmt: skip
            if released and not self._book.has_result(self.job_id):
                await self._fetch_live(core)
                if not self._book.has_result(self.job_id) and self.record.signaling_url:
                    await check_mail(self.identity, self.record.signaling_url, self._book)
                    if not self._book.has_result(self.job_id):
                        self._book.update(self.job_id, state=str(_S.DELIVERED), reason=(
                            "the host delivered the results elsewhere, or no longer keeps "
                            "them"), at=self.record.updated_at)  # fmt: skip
            elif wait and self.record.job_state not in ENDED:
                await core.wait_job_change(seen, min(wait, LIVE_POLL_SECONDS))
        elif self.record.signaling_url is not None:
            await check_mail(self.identity, self.record.signaling_url, self._book, wait)
        return self.record

    def _apply(self, row: dict[str, Any]) -> None:
        """Record a row the host sent, if it is well formed (it is the host's word)."""
        progress = row.get("progress")
        shown = (0, 0)
        if (isinstance(progress, list) and len(progress) == 2
                and all(type(p) is int for p in progress)):  # fmt: skip
            shown = (progress[0], progress[1])
        try:
            update = JobUpdate(self.job_id, row.get("state"), row.get("reason"),  # type: ignore[arg-type]
                               row.get("updated_at"), progress=shown)  # type: ignore[arg-type]  # fmt: skip
        except (DuetError, ValueError, TypeError):
            return
        if update.job_state is _S.DELIVERED and not self._book.has_result(self.job_id):
            return  # only results in hand make a job delivered here
        self._book.update(self.job_id, state=str(update.state), reason=update.reason,
                          at=update.at, progress=update.progress or None)  # fmt: skip

    async def _fetch_live(self, core: Any) -> None:
        row, bundle = await core.fetch_job_result(self.job_id, MAX_RESULT_BYTES, timeout=600)
        if bundle is None:
            if isinstance(row, dict):
                self._apply(row)
            return
        self._keep(bundle)

    def _keep(self, data: bytes) -> None:
        bundle = ResultBundle.from_bytes(data, max_bytes=MAX_RESULT_BYTES)
        open_result(bundle, self.signed, host_id=self.host_id, max_bytes=MAX_RESULT_BYTES)
        self._book.put_result(self.job_id, data)
        self._book.update(self.job_id, state=str(_S.DELIVERED),
                          reason="results received and verified", at=self.record.updated_at)  # fmt: skip

    # -- waiting and collecting -------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> str:
        """Wait until the job has ended (results received, or ended without them); its
        state. RequestTimeout after ``timeout`` s (the job goes on)."""
        return get_runtime().run(self.wait_async(timeout))

    async def wait_async(self, timeout: float | None = None) -> str:
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        bar = _StepsBar(self.job_id) if _interactive_stderr() else None
        try:
            while True:
                left = None if end is None else end - loop.time()
                await self.refresh_async(0.0 if left is not None and left <= 0 else
                                         min(MAIL_WAIT_SECONDS, left or MAIL_WAIT_SECONDS))  # fmt: skip
                record = self.record
                if bar is not None:
                    bar.show(record)
                state = record.job_state
                if state in ENDED:
                    return str(state)
                if end is not None and loop.time() >= end:
                    raise RequestTimeout(f"job {self.job_id} is {state} after {timeout:g} s; "
                                         "it goes on: wait again later")  # fmt: skip
        finally:
            if bar is not None:
                bar.close()

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The released outputs by name (tensors, numbers, ``nn.Module``...), checked
        against the host's receipt. Waits up to ``timeout`` s; JobFailed if the job ended
        without results."""
        return get_runtime().run(self.result_async(timeout))

    async def result_async(self, timeout: float | None = None) -> dict[str, Any]:
        if not self._book.has_result(self.job_id):
            await self.wait_async(timeout)
        bundle = self._bundle()
        if bundle is None:
            record = self.record
            if record.job_state in (_S.REJECTED, _S.WITHHELD):
                raise PermissionDenied(f"job {self.job_id} was {record.state}: {self.reason}",
                                       reason=self.reason)  # fmt: skip
            raise JobFailed(self.job_id, record.state, self.reason)
        _, values = await asyncio.to_thread(open_result, bundle, self.signed,
                                            host_id=self.host_id, max_bytes=MAX_RESULT_BYTES)  # fmt: skip
        return values

    def cancel(self) -> None:
        """Ask the host to cancel the job (before or while it runs)."""
        get_runtime().run(self.cancel_async())

    async def cancel_async(self) -> None:
        core = self._live()
        if core is not None:
            row = await core.cancel_job(self.job_id)
            if isinstance(row, dict):
                self._apply(row)
            return
        record = self.record
        if record.signaling_url is None:
            raise DuetError("this job can only be cancelled live: connect to its host")
        key = pinned_host_key(record.host_id)
        payload = codec.encode({"job_id": self.job_id})
        envelopes = job_mail.seal_mail(self.identity, record.host_id, key, job_mail.CANCEL,
                                       payload)  # fmt: skip
        async with MailboxClient(record.signaling_url, self.identity) as client:
            await job_mail.post_mail(client, record.host_id, envelopes)

    def __repr__(self) -> str:
        record = self.record
        return f"<Job {self.job_id} on {record.host_id}: {record.state}>"


class _StepsBar:
    """A tqdm bar of a job's steps, its state as the description (interactive only)."""

    def __init__(self, job_id: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=0, desc=f"job {job_id[:8]}", unit="step", leave=False)

    def show(self, record: JobRecord) -> None:
        done, total = record.progress
        bar = self._bar
        if total and bar.total != total:
            bar.total = total
        if done > bar.n:
            bar.update(done - bar.n)
        bar.set_postfix_str(record.state, refresh=True)

    def close(self) -> None:
        self._bar.close()


# -- the list --------------------------------------------------------------------------


class JobsList(TableView):
    """The scientist's jobs on this machine, newest first: ``[0]``, ``["<job id>"]``."""

    def __init__(self, identity: Identity, host_id: str | None = None, core: Any = None) -> None:
        book = JobBook(identity.id)
        records = [book.record(job_id) for job_id in reversed(book.ids())]
        self._jobs = [
            Job(identity, r.job_id, core=core, book=book) for r in records
            if r is not None and (host_id is None or r.host_id == host_id)
        ]  # fmt: skip

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Any:
        return iter(self._jobs)

    def __getitem__(self, key: int | str) -> Job:
        if isinstance(key, str):
            for job in self._jobs:
                if job.job_id == key:
                    return job
            raise KeyError(f"no job {printable(key, 64)!r}")
        return self._jobs[key]

    def table(self) -> Table:
        rows = []
        for job in self._jobs:
            record = job.record
            done, total = record.progress
            rows.append([job.job_id, record.host_id, record.state,
                         f"{done}/{total}" if total else "", format_clock(record.updated_at),
                         printable(record.reason, 200)])  # fmt: skip
        return Table(["Job ID", "Host ID", "State", "Steps", "Updated", "Reason"], rows,
                     empty_text="No jobs submitted from this machine.")  # fmt: skip


# -- submitting ------------------------------------------------------------------------


def pinned_host_key(host_id: str, host_key: bytes | str | None = None) -> bytes:
    """The host's public key: ``host_key`` if given (it must hash to ``host_id``; it is
    then pinned), else the one pinned when the scientist last connected to it live."""
    host_id = check_id(host_id, "Host ID")
    keys = KnownKeys()
    if host_key is not None:
        raw = _key_bytes(host_key)
        if not key_matches(host_id, raw):
            raise KeyNotPinned(f"that key is not the key of host {host_id}")
        keys.remember(raw)
        return raw
    try:
        return keys.get(host_id)
    except KeyNotPinned:
        raise KeyNotPinned(
            f"the key of host {host_id} is not known here: connect to it live once "
            "(sy.join_duet), or pass host_key= (its owner's `duet-host id --json` shows it)"
        ) from None


def _key_bytes(value: bytes | str) -> bytes:
    import base64
    import binascii

    if isinstance(value, str):
        try:
            value = bytes.fromhex(value) if len(value) == 64 else base64.b64decode(
                value, validate=True)  # fmt: skip
        except (ValueError, binascii.Error):
            raise KeyNotPinned("host_key is 32 bytes, in hex or base64") from None
    return check_key(value)


def record_job(book: JobBook, signed: SignedJob, url: str | None, via: str,
               row: Mapping[str, Any] | None = None) -> None:  # fmt: skip
    state = str(_S.SUBMITTED)
    reason = "left in the host's mailbox" if via == "mailbox" else "submitted"
    at = 0.0  # only the host's clock orders what is heard of a job
    if row is not None and isinstance(row.get("state"), str):
        state, reason = row["state"], str(row.get("reason", ""))
        at = float(row.get("updated_at", at))
    book.add(signed, JobRecord(job_id=signed.job_id, host_id=signed.spec.host_id,
                               signaling_url=url, state=str(parse_state(state)),
                               reason=reason, updated_at=at, submitted_via=via))  # fmt: skip


async def submit_job_async(
    host_id: str,
    fn: Callable[..., Any],
    *,
    inputs: Mapping[str, str],
    outputs: Sequence[str] | str,
    reason: str,
    signaling_url: str | None = None,
    identity: Identity | str | None = None,
    host_key: bytes | str | None = None,
    max_seconds: float = 600.0,
    deadline: float | None = None,
    max_result_bytes: int | None = None,
    max_result_elements: int | None = None,
) -> Job:
    """``submit_job`` on the caller's loop."""
    url = configured_url(signaling_url)
    if url is None:
        raise DuetError("give signaling_url= (or set DUET_SIGNALING_URL): the mailbox is there")
    who = identity if isinstance(identity, Identity) else Identity.load(identity or "default")
    key = pinned_host_key(host_id, host_key)
    extra = _caps(max_result_bytes, max_result_elements)
    signed = build_job(who, check_id(host_id, "Host ID"), fn, inputs=inputs, outputs=outputs,
                       reason=reason, max_seconds=max_seconds, deadline=deadline, **extra)  # fmt: skip
    envelopes = job_mail.seal_mail(who, signed.spec.host_id, key, job_mail.JOB, signed.to_wire())
    book = JobBook(who.id)
    record_job(book, signed, url, "mailbox")
    try:
        async with MailboxClient(url, who) as client:
            await job_mail.post_mail(client, signed.spec.host_id, envelopes)
    except BaseException:
        book.forget(signed.job_id)  # never (wholly) sent: no record of a job that is not
        raise
    return Job(who, signed.job_id, book=book)


def _caps(max_result_bytes: int | None, max_result_elements: int | None) -> dict[str, int]:
    """The result caps given (the others keep their defaults)."""
    caps = {"max_result_bytes": max_result_bytes, "max_result_elements": max_result_elements}
    return {name: value for name, value in caps.items() if value is not None}


def submit_job(host_id: str, fn: Callable[..., Any], **options: Any) -> Job:
    """Submit a job to a standing host that may be offline: it waits, end-to-end
    encrypted, in the host's mailbox on the signaling server until the host reads it.

    ``fn`` is recorded here as a plan (its parameters named in ``inputs`` stand for the
    host's datasets with those tags; a parameter named ``torch`` is the remote torch).
    ``outputs`` names each value ``fn`` returns; ``reason`` is shown to the owner;
    ``max_seconds`` bounds the run; ``max_result_bytes`` and ``max_result_elements`` bound
    what it may return; ``deadline`` (a ``time.time()``) ends the job if it
    is not done by then. The host's key must be known: pinned by an earlier live
    connection, or given as ``host_key``. Returns the :class:`Job`."""
    return get_runtime().run(submit_job_async(host_id, fn, **options))


def jobs(host_id: str | None = None, *, identity: Identity | str | None = None) -> JobsList:
    """The jobs submitted from this machine (to ``host_id``, if given), newest first."""
    who = identity if isinstance(identity, Identity) else Identity.load(identity or "default")
    return JobsList(who, host_id)
