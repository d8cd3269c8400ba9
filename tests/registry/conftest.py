"""Registry fixtures: a database URL per test, on SQLite and on a real PostgreSQL.

``postgres`` (session): a throwaway PostgreSQL server from Debian's binaries
(``postgres_server.py``); skipped when they are missing, unless ``$CI`` is set (then the
tests fail: CI must run both databases). ``database_url`` (per test, parametrized
``sqlite`` / ``postgresql``): a fresh, empty database (not migrated), dropped afterwards.
``registry_engine``: an engine on it, migrated to the newest schema.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from postgres_server import PostgresServer, find_binaries, start_postgres
from sqlalchemy.ext.asyncio import AsyncEngine

from registry_server.db import make_engine
from registry_server.migrate import upgrade

DATABASES = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for the whole test session."""
    if find_binaries() is None:
        reason = "no PostgreSQL binaries in /usr/lib/postgresql/<n>/bin (Debian's postgresql)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must test PostgreSQL")
        pytest.skip(reason)
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database's URL: ``sqlite:///...`` in tmp_path, or a new PostgreSQL one."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database()
    yield url
    server.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture
async def registry_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on ``database_url``, its schema migrated; disposed afterwards."""
    engine = make_engine(database_url)
    await upgrade(engine)
    yield engine
    await engine.dispose()
