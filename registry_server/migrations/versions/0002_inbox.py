"""Session requests and replies, reviews, and access nonces (the inbox).

Revision ID: 0002
Revises: 0001
Create Date: 2025-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.String(32)


def upgrade() -> None:
    op.create_table(
        "session_requests",
        sa.Column("request_id", ID, primary_key=True),
        sa.Column("listing_id", ID, nullable=False),
        sa.Column("host_id", ID, nullable=False),
        sa.Column("scientist_id", ID, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("start", sa.Double(), nullable=True),
        sa.Column("wire", sa.Text(), nullable=False),
    )
    op.create_index(
        "ix_session_requests_host_created", "session_requests", ["host_id", "created_at"]
    )
    op.create_index(
        "ix_session_requests_scientist_created",
        "session_requests",
        ["scientist_id", "created_at"],
    )
    op.create_table(
        "session_replies",
        sa.Column("reply_id", ID, primary_key=True),
        sa.Column(
            "request_id",
            ID,
            sa.ForeignKey("session_requests.request_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("wire", sa.Text(), nullable=False),
        sa.UniqueConstraint("request_id", "seq", name="uq_session_replies_request_seq"),
    )
    op.create_table(
        "reviews",
        sa.Column("listing_id", ID, primary_key=True),
        sa.Column("reviewer_id", ID, primary_key=True),
        sa.Column("stars", sa.Integer(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("wire", sa.Text(), nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_reviews_listing_received", "reviews", ["listing_id", "received_at"])
    op.create_table(
        "access_nonces",
        sa.Column("identity_id", ID, primary_key=True),
        sa.Column("nonce", ID, primary_key=True),
        sa.Column("expires_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_access_nonces_expires_at", "access_nonces", ["expires_at"])


def downgrade() -> None:
    for name in ("access_nonces", "reviews", "session_replies", "session_requests"):
        op.drop_table(name)
