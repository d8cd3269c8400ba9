"""Bring a registry database's schema up to date with its Alembic migrations.

:func:`upgrade` runs ``alembic upgrade head`` from ``registry_server/migrations`` (no
``alembic.ini``: the configuration is built here) on one connection, in one transaction,
holding a lock first: PostgreSQL's transaction-scoped advisory lock, SQLite's write lock
(``BEGIN IMMEDIATE``). A second process starting at the same moment waits, then finds the
schema current and does nothing; an upgrade that fails leaves the database as it was
(both databases have transactional DDL). Safe to call on every start.

The applied revision is kept in the table ``registry_schema_version`` (not Alembic's
default name, so the registry can share a database with another Alembic user).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, text
from sqlalchemy.ext.asyncio import AsyncEngine

from registry_server.db import WRITE_OPTIONS

__all__ = [
    "MIGRATIONS", "VERSION_TABLE", "current", "downgrade", "head", "target_metadata", "upgrade",
]  # fmt: skip

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "registry_schema_version"
LOCK_KEY = 0x4455_4554_5245_47  # "DUETREG": the advisory lock of registry migrations


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def target_metadata() -> list[MetaData]:
    """The tables the migrations must produce (the search tables aside: see
    :data:`registry_server.db.SEARCH_TABLES`)."""
    from registry_server import db, db_inbox

    inbox = db_inbox.metadata
    return [db.metadata] if inbox is db.metadata else [db.metadata, inbox]


def head() -> str:
    """The newest revision."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def _current(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


async def current(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    async with engine.connect() as conn:
        return await conn.run_sync(_current)


async def _locked(engine: AsyncEngine, step: Callable[[Connection], None]) -> None:
    """Run ``step`` on one connection, in one transaction, holding the migration lock."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(**WRITE_OPTIONS)
        async with conn.begin():
            if conn.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            await conn.run_sync(step)


async def upgrade(engine: AsyncEngine) -> None:
    """Create or migrate the registry's schema to the newest revision (idempotent)."""
    await _locked(engine, lambda connection: command.upgrade(_config(connection), "head"))


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Undo migrations down to ``revision`` ("base": none at all; its data is lost)."""
    await _locked(engine, lambda connection: command.downgrade(_config(connection), revision))
