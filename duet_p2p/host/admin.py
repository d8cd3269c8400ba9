"""What ``duet-host`` may ask of a running host through its control socket.

Each call comes from the control server's worker thread, never the host's event loop;
everything it touches is thread-safe (the request queue, the admission policy, the state,
the host's jobs).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from duet_p2p.errors import DuetError
from duet_p2p.host.host import Host
from duet_p2p.host.jobs_view import MAX_LISTED, OWNER, job_details, job_row
from duet_p2p.host.registry_link import RegistryAdmin
from duet_p2p.offline.lifecycle import OPEN, JobState
from duet_p2p.permissions import Request

log = logging.getLogger(__name__)

_DECIDED = {"approve": "approved", "reject": "rejected", "release": "released",
            "withhold": "withheld", "cancel": "cancelled"}  # fmt: skip
MAX_AUDIT_BYTES = 64 << 20
"""The most of the audit log's tail a single ``duet-host audit`` reads."""


class HostAdmin(RegistryAdmin):
    """``HostControl`` for one running Host (the registry commands from ``RegistryAdmin``)."""

    _host: Host

    def __init__(self, host: Host) -> None:
        self._host = host

    def control_status(self) -> dict[str, Any]:
        host = self._host
        requests = host.owner.requests
        return {
            "host_id": host.id,
            "online": host.online,
            "signaling_url": host.options.signaling_url,
            "uptime_seconds": round(time.time() - host.started_at, 1),
            "connected": host.connected(),
            "pending_requests": len(requests),
            "pending_admissions": len(host.admission.pending()),
            "hosted": [
                {"id": r.id, "tags": list(r.tags), "public": not r.private}
                for r in host.owner.store.owner_records()
            ],
            "data_dir": str(host.host_dir),
            **self._job_counts(),
        }

    def _job_counts(self) -> dict[str, Any]:
        jobs = getattr(self._host, "_jobs", None)
        if jobs is None:
            return {"jobs": "disabled"}
        waiting = {JobState.PENDING_REVIEW: 0, JobState.PENDING_OUTPUT_REVIEW: 0}
        try:
            for stored in jobs.list(set(waiting), MAX_LISTED):
                waiting[stored.state] = waiting.get(stored.state, 0) + 1
        except Exception:  # noqa: BLE001 - the status still answers
            log.warning("counting the host's jobs failed", exc_info=True)
            return {"jobs": "unavailable (see the host's log)"}
        return {"jobs_pending_review": waiting[JobState.PENDING_REVIEW],
                "jobs_pending_output_review": waiting[JobState.PENDING_OUTPUT_REVIEW]}  # fmt: skip

    def control_requests(self, all: bool) -> list[dict[str, Any]]:
        queue = self._host.owner.requests
        if all:
            live = {r.request_id: r for r in queue.all()}
            rows = [_stored_row(s) for s in self._host.state.all_requests(limit=1000)]
            for row in rows:
                if row["request_id"] in live:
                    row.update(_live_row(live[row["request_id"]]))
            return rows
        return [_live_row(r) for r in queue.pending()]

    def control_accept(self, request_id: str) -> dict[str, Any]:
        request = self._host.owner.requests.accept(request_id)
        return {"request_id": request.request_id, "status": request.status.value}

    def control_deny(self, request_id: str, reason: str) -> dict[str, Any]:
        request = self._host.owner.requests.deny(request_id, reason)
        return {"request_id": request.request_id, "status": request.status.value}

    def control_admissions(self) -> list[dict[str, Any]]:
        return self._host.admission.rows()

    def control_admit(self, client_id: str) -> dict[str, Any]:
        self._host.admission.admit(client_id)
        return {"client_id": client_id, "status": "admitted"}

    def control_refuse(self, client_id: str, reason: str) -> dict[str, Any]:
        self._host.admission.refuse(client_id, reason)
        return {"client_id": client_id, "status": "refused"}

    # -- jobs ---------------------------------------------------------------------------

    def _jobs(self) -> Any:
        jobs = getattr(self._host, "_jobs", None)
        if jobs is None:
            raise DuetError("this host does not take jobs (set enabled = true under [jobs] in "
                            "its host.toml)")  # fmt: skip
        return jobs

    def control_jobs(self, all: bool) -> list[dict[str, Any]]:
        return [job_row(s) for s in self._jobs().list(None if all else OPEN, MAX_LISTED)]

    def control_job(self, job_id: str) -> dict[str, Any]:
        jobs = self._jobs()
        _known(jobs, job_id)
        return job_details(jobs, job_id)

    def control_approve(self, job_id: str) -> dict[str, Any]:
        return self._decide(job_id, "approve")

    def control_reject(self, job_id: str, reason: str) -> dict[str, Any]:
        return self._decide(job_id, "reject", reason)

    def control_release(self, job_id: str) -> dict[str, Any]:
        return self._decide(job_id, "release")

    def control_withhold(self, job_id: str, reason: str) -> dict[str, Any]:
        return self._decide(job_id, "withhold", reason)

    def control_cancel(self, job_id: str) -> dict[str, Any]:
        return self._decide(job_id, "cancel")

    def _decide(self, job_id: str, decision: str, *reason: str) -> dict[str, Any]:
        """Make one of the owner's decisions on a job; the decision, and the job's state
        right after (a released job stays in output review until its receipt is signed)."""
        jobs = self._jobs()
        _known(jobs, job_id)
        getattr(jobs, decision)(job_id, *reason, by=OWNER)
        state = str(_known(jobs, job_id).state)
        return {"job_id": job_id, "decision": _DECIDED[decision], "state": state}

    def control_audit(self, last: int) -> list[dict[str, Any]]:
        path = self._host.audit.path
        if not path.exists():
            return []
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - MAX_AUDIT_BYTES))
            lines = f.read().splitlines()
        entries: list[dict[str, Any]] = []
        for line in reversed(lines):
            if len(entries) >= last:
                break
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line (the host was killed mid-write)
            if isinstance(entry, dict):
                entries.append(entry)
        entries.reverse()
        return entries


def _known(jobs: Any, job_id: str) -> Any:
    """The stored job; an unknown one is a refusal the owner reads."""
    try:
        return jobs.get(job_id)
    except KeyError:
        raise DuetError(f"this host has no job {job_id}") from None


def _live_row(request: Request) -> dict[str, Any]:
    return {
        "request_id": request.request_id, "name": request.name, "client_id": request.requester,
        "reason": request.reason, "status": request.status.value,
        "size_bytes": request.size_bytes, "requested_at": request.requested_at,
        "decided_at": request.decided_at, "decided_by": request.decided_by or "",
        "lineage": request.lineage, "checks": list(request.checks),
        "dp": request.dp.query if request.dp is not None else "",
    }  # fmt: skip


def _stored_row(stored: Any) -> dict[str, Any]:
    return {
        "request_id": stored.request_id, "name": stored.name, "client_id": stored.client_id,
        "reason": stored.reason, "status": stored.status, "size_bytes": stored.size_bytes,
        "requested_at": stored.requested_at, "decided_at": stored.decided_at,
        "decided_by": stored.decided_by or "", "lineage": stored.lineage,
        "checks": list(stored.checks), "dp": "dp" if stored.dp else "",
    }  # fmt: skip
