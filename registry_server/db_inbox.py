"""The registry's tables for sessions, reviews and access nonces (on ``db.metadata``).

``session_requests`` holds each signed session request (``wire``) with columns to find it
by host (the inbox) and by scientist (sent requests), its current ``status`` and agreed
``start``; ``session_replies`` the signed replies in the order received (``seq`` from 1);
``reviews`` one signed review per reviewer and listing; ``access_nonces`` the nonces of
access documents taken, until they would be refused as stale anyway. Times are unix
seconds: ``created_at``/``received_at`` on the registry's clock, ``at`` as signed.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from registry_server.db import metadata

__all__ = ["access_nonces", "reviews", "session_replies", "session_requests"]

ID_CHARS = 32

session_requests = Table(
    "session_requests",
    metadata,
    Column("request_id", String(ID_CHARS), primary_key=True),
    Column("listing_id", String(ID_CHARS), nullable=False),
    Column("host_id", String(ID_CHARS), nullable=False),
    Column("scientist_id", String(ID_CHARS), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("status", String(16), nullable=False),
    Column("start", Double, nullable=True),
    Column("wire", Text, nullable=False),
    Index("ix_session_requests_host_created", "host_id", "created_at"),
    Index("ix_session_requests_scientist_created", "scientist_id", "created_at"),
)

session_replies = Table(
    "session_replies",
    metadata,
    Column("reply_id", String(ID_CHARS), primary_key=True),
    Column(
        "request_id",
        String(ID_CHARS),
        ForeignKey("session_requests.request_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("seq", Integer, nullable=False),
    Column("at", Double, nullable=False),
    Column("wire", Text, nullable=False),
    UniqueConstraint("request_id", "seq", name="uq_session_replies_request_seq"),
)

reviews = Table(
    "reviews",
    metadata,
    Column("listing_id", String(ID_CHARS), primary_key=True),
    Column("reviewer_id", String(ID_CHARS), primary_key=True),
    Column("stars", Integer, nullable=False),
    Column("at", Double, nullable=False),
    Column("wire", Text, nullable=False),
    Column("received_at", Double, nullable=False),
    Index("ix_reviews_listing_received", "listing_id", "received_at"),
)

access_nonces = Table(
    "access_nonces",
    metadata,
    Column("identity_id", String(ID_CHARS), primary_key=True),
    Column("nonce", String(ID_CHARS), primary_key=True),  # 16 bytes as hex
    Column("expires_at", Double, nullable=False, index=True),
)
