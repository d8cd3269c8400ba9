"""Listings, hosts, heartbeat nonces, keywords, tombstones, and full-text search.

Revision ID: 0001
Revises:
Create Date: 2025-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.String(32)
SQLITE_SEARCH = (
    "CREATE TABLE listings_search_ids ("
    "id INTEGER PRIMARY KEY AUTOINCREMENT, listing_id TEXT NOT NULL UNIQUE, "
    "host_id TEXT NOT NULL)",
    "CREATE VIRTUAL TABLE listings_fts USING fts5("
    "name, summary, description, keywords, facets, "
    "tokenize = 'unicode61 remove_diacritics 2')",
    # weighted as ts_rank's A, B, C, B on PostgreSQL; facets (filter values) do not rank
    "INSERT INTO listings_fts (listings_fts, rank) "
    "VALUES ('rank', 'bm25(10.0, 4.0, 2.0, 4.0, 0.0)')",
)
POSTGRES_SEARCH = (
    "CREATE TABLE listings_search ("
    "listing_id VARCHAR(32) PRIMARY KEY "
    "REFERENCES listings (listing_id) ON DELETE CASCADE, "
    "host_id VARCHAR(32) NOT NULL, "
    "document TSVECTOR NOT NULL, "
    "facets TSVECTOR NOT NULL)",
    "CREATE INDEX ix_listings_search_document ON listings_search USING GIN (document)",
    "CREATE INDEX ix_listings_search_facets ON listings_search USING GIN (facets)",
)


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("host_id", ID, primary_key=True),
        sa.Column("host_key", sa.LargeBinary(32), nullable=False),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=True),
    )
    op.create_table(
        "heartbeat_nonces",
        sa.Column(
            "host_id",
            ID,
            sa.ForeignKey("hosts.host_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("nonce", sa.LargeBinary(16), primary_key=True),
        sa.Column("expires_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_heartbeat_nonces_expires_at", "heartbeat_nonces", ["expires_at"])
    op.create_table(
        "listings",
        sa.Column("listing_id", ID, primary_key=True),
        sa.Column("host_id", ID, sa.ForeignKey("hosts.host_id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("license", sa.String(64), nullable=False),
        sa.Column("keywords", sa.Text(), nullable=False),
        sa.Column("wire", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("published_at", sa.Double(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_listings_host_id", "listings", ["host_id"])
    op.create_index("ix_listings_deleted_published", "listings", ["deleted", "published_at"])
    op.create_table(
        "listing_keywords",
        sa.Column(
            "listing_id",
            ID,
            sa.ForeignKey("listings.listing_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("keyword", sa.String(256), primary_key=True),
    )
    op.create_index("ix_listing_keywords_keyword", "listing_keywords", ["keyword"])
    op.create_table(
        "tombstones",
        sa.Column("listing_id", ID, primary_key=True),
        sa.Column("host_id", ID, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("wire", sa.Text(), nullable=False),
    )
    op.create_index("ix_tombstones_host_id", "tombstones", ["host_id"])
    dialect = op.get_bind().dialect.name
    for statement in {"sqlite": SQLITE_SEARCH, "postgresql": POSTGRES_SEARCH}[dialect]:
        op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TABLE listings_fts")
        op.drop_table("listings_search_ids")
    else:
        op.drop_table("listings_search")
    for name in ("tombstones", "listing_keywords", "listings", "heartbeat_nonces", "hosts"):
        op.drop_table(name)
