"""The owner's side of releasing values: requests, auto-decision handlers, the audit log."""

from duet_p2p.permissions.audit import AuditLog, default_audit_path
from duet_p2p.permissions.policy import Handler, HandlerList
from duet_p2p.permissions.request import Request, RequestQueue, RequestStatus
from duet_p2p.table import Table, TableView, format_clock, format_size, uid_label

__all__ = [
    "AuditLog",
    "Handler",
    "HandlerList",
    "Request",
    "RequestQueue",
    "RequestStatus",
    "Table",
    "TableView",
    "default_audit_path",
    "format_clock",
    "format_size",
    "uid_label",
]
