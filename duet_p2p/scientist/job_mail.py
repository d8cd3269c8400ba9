"""The scientist's mailbox: job notices and results from hosts, while the scientist was away.

Only mail from the hosts of the scientist's own jobs is opened; a result is kept only once
its receipt verifies against the job the scientist signed (:func:`open_result`). A stream
(a large result) is opened only when all its parts are on the server, so a part that is
still on its way is left for the next look.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from duet_p2p.identity import Identity
from duet_p2p.mailbox.client import Delivered, MailboxClient
from duet_p2p.mailbox.envelope import EnvelopeRefused, SeenMessages, peek_header
from duet_p2p.offline import mail as job_mail
from duet_p2p.offline.lifecycle import JobState
from duet_p2p.offline.receipt import InvalidReceipt
from duet_p2p.offline.results import InvalidResult, JobUpdate, ResultBundle, open_result
from duet_p2p.paths import data_dir
from duet_p2p.scientist.job_book import JobBook
from duet_p2p.text import printable

__all__ = ["MAX_RESULT_BYTES", "check_mail"]

log = logging.getLogger(__name__)

MAX_RESULT_BYTES = 512 << 20
"""Largest result bundle taken from the mailbox."""
MAX_FETCH_BYTES = MAX_RESULT_BYTES + (MAX_RESULT_BYTES >> 1)
"""Most envelope bytes one look at the mailbox holds at once."""
MAX_PAGES = 10_000
STALE_STREAM_SECONDS = 3600.0
"""A stream missing parts this long after its last one arrived is deleted."""


def complete(
    delivered: Iterable[Delivered], now: float | None = None
) -> tuple[list[Delivered], list[str]]:
    """(the messages ready to open, the IDs of stale ones to delete). Ready: single
    envelopes, and every part of a stream whose parts are all here (in order of arrival);
    unreadable headers pass through (the opener refuses them). Stale: the parts of a
    stream that stopped arriving ``STALE_STREAM_SECONDS`` ago (its sender gave up)."""
    now = time.time() if now is None else now
    ready: list[Delivered] = []
    streams: dict[tuple[str, bytes], list[Delivered]] = {}
    counts: dict[tuple[str, bytes], int] = {}
    for item in delivered:
        try:
            header = peek_header(item.envelope)
        except (EnvelopeRefused, ValueError):
            ready.append(item)
            continue
        stream = header.stream
        if stream is None:
            ready.append(item)
            continue
        key = (item.sender_id, stream.stream_id)
        streams.setdefault(key, []).append(item)
        counts[key] = stream.count
    stale: list[str] = []
    for key, parts in streams.items():
        if len(parts) >= counts[key] + 1:
            ready.extend(parts)
        elif now - max(part.posted_at for part in parts) > STALE_STREAM_SECONDS:
            stale.extend(part.message_id for part in parts)
    return ready, stale


async def check_mail(identity: Identity, url: str, book: JobBook, wait: float = 0.0) -> int:
    """Read the scientist's mailbox at ``url`` (waiting up to ``wait`` s for mail), record
    what the hosts said in ``book``; returns how many notices were recorded."""
    hosts = {}
    for job_id in book.ids():
        record = book.record(job_id)
        if record is not None:
            hosts.setdefault(record.host_id, []).append(job_id)
    seen = SeenMessages.open(data_dir() / "mailbox" / identity.id)
    opener = job_mail.MailOpener(
        identity, kinds={job_mail.UPDATE, job_mail.RESULT}, seen=seen,
        max_bytes=MAX_RESULT_BYTES, senders=lambda sender: sender in hosts,
    )  # fmt: skip
    recorded = 0
    try:
        async with MailboxClient(url, identity) as client:
            fetched: list[Delivered] = []
            held = 0
            after = None
            for page in range(MAX_PAGES):
                batch = await client.fetch(wait if page == 0 else 0.0, after=after)
                if not batch:
                    break
                after = batch[-1].message_id
                # mail from others (another machine's jobs of this identity) stays for them
                mine = [item for item in batch if item.sender_id in hosts]
                fetched.extend(mine)
                held += sum(len(item.envelope) for item in mine)
                if held > MAX_FETCH_BYTES:
                    break  # the rest waits for the next look
            ready, stale = complete(fetched)
            for mail in opener.add(ready):
                recorded += _record(book, mail)
            done = [*opener.deletable_ids(), *stale]
            if done:
                await client.delete(done)
    finally:
        seen.close()
    return recorded


def _record(book: JobBook, mail: job_mail.Mail) -> int:
    try:
        if mail.kind == job_mail.UPDATE:
            update = JobUpdate.from_bytes(mail.payload)
            record = book.record(update.job_id)
            if record is None or record.host_id != mail.sender_id:
                return 0
            if update.job_state is JobState.DELIVERED and not book.has_result(update.job_id):
                return 0  # only results, verified, make a job delivered here
            book.update(update.job_id, state=update.state, reason=update.reason,
                        at=update.at, progress=update.progress)  # fmt: skip
            return 1
        bundle = ResultBundle.from_bytes(mail.payload, max_bytes=MAX_RESULT_BYTES)
        record = book.record(bundle.job_id)
        if record is None or record.host_id != mail.sender_id:
            return 0
        open_result(bundle, book.signed(bundle.job_id), host_id=record.host_id,
                    max_bytes=MAX_RESULT_BYTES)  # fmt: skip
        book.put_result(bundle.job_id, mail.payload)
        book.update(bundle.job_id, state=str(JobState.DELIVERED),
                    reason="results received and verified", at=max(record.updated_at, 0.0))  # fmt: skip
        return 1
    except (InvalidResult, InvalidReceipt, ValueError, KeyError) as exc:
        log.warning("a job notice from %s was refused: %s", mail.sender_id,
                    printable(str(exc), 300))  # fmt: skip
        return 0
