"""A host's job traffic through the signaling server's end-to-end encrypted mailbox.

Jobs (and cancellations) from scientists who are offline arrive in the host's mailbox:
each is opened (sealed to the host, signed by its sender, not a replay), and a job must be
signed by the scientist who sent it. Every submission is answered with the job's state.
Notices go back the same way: a job's end (rejected, withheld, failed, timed out,
cancelled, expired) and its released results, sealed to the key the scientist signed the
job with. A scientist connected live fetches a release over the data channel instead: the
mailbox waits ``LIVE_GRACE`` seconds for that first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from duet_p2p.errors import DuetError
from duet_p2p.host.job_service import JobRefused
from duet_p2p.host.job_store import DuplicateJob, JobQuotaExceeded, StoredJob
from duet_p2p.mailbox.client import MailboxClient
from duet_p2p.mailbox.envelope import SeenMessages
from duet_p2p.offline import mail as job_mail
from duet_p2p.offline.lifecycle import InvalidTransition, JobState
from duet_p2p.offline.results import JobUpdate
from duet_p2p.offline.spec import InvalidJob, SignedJob
from duet_p2p.rpc import codec
from duet_p2p.text import printable


class MailedJobs(Protocol):
    """What the mailbox needs of the host's jobs (a ``HostJobs``, which owns this mailbox)."""

    host: Any
    settings: Any
    store: Any

    async def submit_for(self, client_id: str, wire: bytes, via: str = ...) -> dict[str, Any]: ...

    async def cancel_for(self, client_id: str, job_id: str) -> dict[str, Any]: ...

    def row(self, job: StoredJob) -> dict[str, Any]: ...

    def bundle(self, job: StoredJob) -> Any: ...

    def _delivered(self, job_id: str, how: str) -> None: ...


__all__ = ["JobMail", "NOTICED"]

log = logging.getLogger(__name__)

NOTICED = frozenset({
    JobState.REJECTED, JobState.WITHHELD, JobState.FAILED, JobState.TIMED_OUT,
    JobState.CANCELLED, JobState.EXPIRED, JobState.RELEASED,
})  # fmt: skip
"""States a scientist is sent a notice of (RELEASED: the results)."""
LIVE_GRACE = 30.0
"""Seconds a release waits for its scientist, connected live, to fetch it."""
MAX_JOB_MAIL_BYTES = 2 << 20
MAX_BACKOFF = 60.0
MAX_SEND_FAILURES = 3
"""Tries to mail one result before the scientist is told to collect it live instead."""


class JobMail:
    """The host's mailbox: jobs in, notices and results out."""

    def __init__(self, jobs: MailedJobs, url: str) -> None:
        self.jobs = jobs
        self.url = url
        host = jobs.host
        self.identity = host.identity
        self.client = MailboxClient(url, host.identity)
        self.seen = SeenMessages.open(host.host_dir / "mailbox")
        self.opener = job_mail.MailOpener(
            host.identity, kinds={job_mail.JOB, job_mail.CANCEL}, seen=self.seen,
            max_bytes=MAX_JOB_MAIL_BYTES,
        )  # fmt: skip
        self._after: str | None = None
        self._retry_at = 0.0
        self._failures: dict[str, int] = {}
        self._closed = False

    # -- in -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Fetch and handle mail until closed (a failing server is retried, backing off)."""
        pause, failures = 1.0, 0
        while not self._closed:
            try:
                await self.poll(self.jobs.settings.poll_seconds)
                pause, failures = 1.0, 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the server may be down for a while
                if self._closed:
                    return
                failures += 1  # one dropped long-poll is routine; say so when it persists
                log.log(logging.WARNING if failures > 1 else logging.INFO,
                        "the host's mailbox at %s: %s", self.url, exc)  # fmt: skip
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_BACKOFF)

    async def poll(self, wait: float) -> int:
        """Fetch one page of mail (waiting up to ``wait`` s), handle it, delete what was
        handled or refused; how many mails were handled."""
        delivered = await self.client.fetch(wait, after=self._after)
        handled = 0
        for item in delivered:
            self._after = item.message_id
            for mail in self.opener.add(item):
                await self._on_mail(mail)
                handled += 1
        for message_id, reason in self.opener.refused:
            log.info("refused mailbox message %s: %s", message_id, printable(reason, 200))
        done = self.opener.deletable_ids()
        if done:
            await self.client.delete(done)
            self.opener.forget(done)
        if not delivered:
            self._after = None
        return handled

    async def _on_mail(self, mail: job_mail.Mail) -> None:
        audit = self.jobs.host.audit
        if mail.kind == job_mail.CANCEL:
            await self._on_cancel(mail)
            return
        job_id = ""
        try:
            signed = SignedJob.from_wire(mail.payload)
            job_id = signed.job_id
            row = await self.jobs.submit_for(mail.sender_id, mail.payload, via="mailbox")
        except DuplicateJob:  # sent twice: say where the job stands, to its scientist only
            stored = self.jobs.store.get(job_id)
            if stored is not None and stored.client_id == mail.sender_id:
                await self._tell(mail.sender_id, mail.sender_key,
                                 _update_of(self.jobs.row(stored)))  # fmt: skip
            return
        except Exception as exc:  # refused, or the host could not take it: the sender hears
            if not isinstance(exc, InvalidJob | JobRefused | JobQuotaExceeded | DuetError):
                log.exception("a mailed job could not be taken")
                exc = DuetError("the host could not take it; submit it again")
            reason = getattr(exc, "reason", None) or str(exc)
            audit.event("job_refused", job_id=job_id, client_id=mail.sender_id, via="mailbox",
                        reason=printable(reason, 500))  # fmt: skip
            if job_id:
                await self._tell(mail.sender_id, mail.sender_key,
                                 JobUpdate(job_id, str(JobState.REJECTED), reason, time.time()))  # fmt: skip
            return
        state = JobState(row["state"])
        await self._tell(mail.sender_id, mail.sender_key, _update_of(row))
        if state in NOTICED:
            await asyncio.to_thread(self.jobs.store.set_noticed, job_id, state)

    async def _on_cancel(self, mail: job_mail.Mail) -> None:
        try:
            value = codec.decode(mail.payload, limits=codec.DecodeLimits(
                max_depth=2, max_items=4, max_bytes=256, max_tensor_elements=1))  # fmt: skip
            job_id = value["job_id"] if isinstance(value, dict) and len(value) == 1 else None
            if not isinstance(job_id, str):
                raise DuetError("a cancellation names one job_id")
            await self.jobs.cancel_for(mail.sender_id, job_id)
        except (DuetError, KeyError, InvalidTransition, ValueError) as exc:
            log.info("cancellation from %s refused: %s", mail.sender_id, exc)

    # -- out ----------------------------------------------------------------------------

    async def send_notices(self) -> None:
        """Tell each scientist of their jobs' ends and send released results, once each."""
        if time.monotonic() < self._retry_at:
            return
        jobs = self.jobs
        failed = False
        for job in await asyncio.to_thread(jobs.store.unnoticed, NOTICED):
            if self._closed:
                return
            try:  # one scientist's full mailbox never holds up the others'
                if job.state is JobState.RELEASED:
                    if job.client_id in jobs.host.connected() and (
                        time.time() - (job.released_at or 0) < LIVE_GRACE
                    ):
                        continue  # it may be fetched live
                    await self._send_result(job)
                else:
                    await self._tell(job.client_id, job.job.public_key, _update_of(jobs.row(job)))
                    await asyncio.to_thread(jobs.store.set_noticed, job.job_id, job.state)
            except Exception as exc:  # noqa: BLE001 - retried a little later, a few times
                failed = True
                log.warning("a notice of job %s through %s failed: %s", job.job_id, self.url, exc)
                await self._count_failure(job)
        if failed:
            self._retry_at = time.monotonic() + 10.0

    async def _count_failure(self, job: StoredJob) -> None:
        """After ``MAX_SEND_FAILURES`` tries, a notice is given up (a release stays to be
        collected live)."""
        failures = self._failures[job.job_id] = self._failures.get(job.job_id, 0) + 1
        if failures >= MAX_SEND_FAILURES:
            self._failures.pop(job.job_id, None)
            await asyncio.to_thread(self.jobs.store.set_noticed, job.job_id, job.state)

    async def _send_result(self, job: StoredJob) -> None:
        jobs = self.jobs
        bundle = await asyncio.to_thread(jobs.bundle, job)
        if bundle is None:  # its outputs were freed meanwhile
            await asyncio.to_thread(jobs.store.set_noticed, job.job_id, job.state)
            return
        size = sum(len(part) for part in bundle.to_parts())
        limit = jobs.settings.mailbox_max_result_bytes
        if size > limit:
            await self._live_only(job, f"the results ({size} bytes) are larger than this "
                                  f"host mails ({limit} bytes)")  # fmt: skip
            return
        envelopes = job_mail.iter_mail(self.identity, job.client_id, job.job.public_key,
                                       job_mail.RESULT, bundle.to_parts())  # fmt: skip
        try:
            await job_mail.post_mail(self.client, job.client_id, envelopes)
        except Exception as exc:
            if self._failures.get(job.job_id, 0) + 1 < MAX_SEND_FAILURES:
                raise
            self._failures.pop(job.job_id, None)
            await self._live_only(job, f"mailing them failed: {printable(str(exc), 300)}")
            return
        self._failures.pop(job.job_id, None)
        with contextlib.suppress(InvalidTransition):  # fetched live meanwhile
            await asyncio.to_thread(jobs._delivered, job.job_id, "sent through the mailbox")
        await asyncio.to_thread(jobs.store.set_noticed, job.job_id, JobState.DELIVERED)

    async def _live_only(self, job: StoredJob, why: str) -> None:
        """Tell the scientist a release waits for them live (it stays RELEASED)."""
        note = (f"released; {why}: connect to the host to collect them "
                "(sy.join_duet(host_id, identity=...).jobs[job_id].result())")  # fmt: skip
        update = JobUpdate(job.job_id, str(JobState.RELEASED), note, time.time())
        await self._tell(job.client_id, job.job.public_key, update)
        await asyncio.to_thread(self.jobs.store.set_noticed, job.job_id, job.state)

    async def _tell(self, client_id: str, key: bytes, update: JobUpdate) -> None:
        envelopes = job_mail.seal_mail(self.identity, client_id, key, job_mail.UPDATE,
                                       update.to_bytes())  # fmt: skip
        await job_mail.post_mail(self.client, client_id, envelopes)

    async def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            await self.client.close()
        with contextlib.suppress(Exception):
            self.seen.close()


def _update_of(row: dict[str, Any]) -> JobUpdate:
    done, total = row["progress"]
    return JobUpdate(row["job_id"], row["state"], row["reason"], row["updated_at"],
                     progress=(done, total))  # fmt: skip
