"""Reports kept in the database, a settings table, and descriptions rendered at publish.

``listings.description_html`` is added empty (NULL) for the rows already there: the
listing page renders those itself until their next version is published.

Revision ID: 0003
Revises: 0002
Create Date: 2025-06-15
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ID = sa.String(32)


def upgrade() -> None:
    op.add_column("listings", sa.Column("description_html", sa.Text(), nullable=True))
    op.create_table(
        "reports",
        sa.Column("report_id", ID, primary_key=True),
        sa.Column("listing_id", ID, nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("client_key", sa.String(64), nullable=False),
    )
    op.create_index("ix_reports_created_at", "reports", ["created_at"])
    op.create_index(
        "ix_reports_listing_client", "reports", ["listing_id", "client_key", "created_at"]
    )
    op.create_index("ix_reports_client_key", "reports", ["client_key"])
    op.create_table(
        "registry_settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.LargeBinary(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("registry_settings")
    op.drop_table("reports")
    op.drop_column("listings", "description_html")
