"""The registry's Alembic migrations on SQLite and PostgreSQL: they build exactly the tables
the code declares, run again as a no-op, serialize concurrent starts, and roll back whole."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.util.exc import CommandError
from sqlalchemy import Connection, column, event, func, inspect, select, table, text, update

from registry_server import db, migrate
from registry_server.db import make_engine
from registry_server.store import RegistryStore

ROOT = Path(__file__).resolve().parents[2]
OURS = {migrate.VERSION_TABLE} | db.SEARCH_TABLES
VERSIONS = table(migrate.VERSION_TABLE, column("version_num"))


def _include(name: str | None, type_: str, parent: Any) -> bool:
    return not (type_ == "table" and name in OURS)


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "compare_server_default": True,
            "include_name": _include,
            "target_metadata": migrate.target_metadata(),
        },
    )
    return compare_metadata(context, migrate.target_metadata())


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_upgrade_builds_the_declared_schema(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert await migrate.current(engine) is None
        await migrate.upgrade(engine)
        assert await migrate.current(engine) == migrate.head() == "0003"
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            tables = await conn.run_sync(_tables)
        declared = {t.name for m in migrate.target_metadata() for t in m.sorted_tables}
        assert {"listings", "hosts", "session_requests", "reviews", "access_nonces"} <= declared
        assert {"reports", "registry_settings"} <= declared
        assert declared <= tables
        if engine.dialect.name == "sqlite":
            assert {"listings_fts", "listings_search_ids"} <= tables
            assert "listings_search" not in tables
        else:
            assert "listings_search" in tables and "listings_fts" not in tables
            async with engine.connect() as conn:
                method = (
                    await conn.execute(
                        text(
                            "SELECT am.amname FROM pg_index i "
                            "JOIN pg_class c ON c.oid = i.indexrelid "
                            "JOIN pg_am am ON am.oid = c.relam "
                            "WHERE c.relname = 'ix_listings_search_document'"
                        )
                    )
                ).scalar_one()
            assert method == "gin"
    finally:
        await engine.dispose()


async def test_a_second_upgrade_changes_nothing(database_url: str) -> None:
    engine = make_engine(database_url)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    try:
        await migrate.upgrade(engine)
        event.listen(engine.sync_engine, "before_cursor_execute", record)
        await migrate.upgrade(engine)
        assert statements  # the check ran
        writes = [s for s in statements if s.split()[0].upper() in {"CREATE", "ALTER", "DROP"}]
        assert writes == []
        assert not any("INSERT" in s.upper() or "UPDATE" in s.upper() for s in statements)
        assert await migrate.current(engine) == migrate.head()
    finally:
        await engine.dispose()


async def test_concurrent_starts_migrate_once(database_url: str) -> None:
    engines = [make_engine(database_url) for _ in range(4)]
    try:
        await asyncio.wait_for(asyncio.gather(*(migrate.upgrade(e) for e in engines)), 60)
        for engine in engines:
            assert await migrate.current(engine) == migrate.head()
        async with engines[0].connect() as conn:
            assert await conn.run_sync(_diff) == []
            count = (await conn.execute(select(func.count()).select_from(VERSIONS))).scalar_one()
        assert count == 1
    finally:
        for engine in engines:
            await engine.dispose()


BROKEN = """
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("half_done", sa.Column("x", sa.Integer(), primary_key=True))
    op.add_column("listings", sa.Column("extra", sa.Integer(), nullable=True))
    raise RuntimeError("a migration failing halfway")


def downgrade() -> None:
    pass
"""


async def test_a_failing_migration_leaves_nothing_behind(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(database_url)
    try:
        await migrate.upgrade(engine)
        await RegistryStore(engine).search("", now=1.0)
        broken = tmp_path / "migrations"
        shutil.copytree(migrate.MIGRATIONS, broken, ignore=shutil.ignore_patterns("__pycache__"))
        (broken / "versions" / "0004_broken.py").write_text(BROKEN)
        monkeypatch.setattr(migrate, "MIGRATIONS", broken)
        assert migrate.head() == "0004"
        with pytest.raises(RuntimeError, match="halfway"):
            await migrate.upgrade(engine)
        assert await migrate.current(engine) == "0003"
        async with engine.connect() as conn:
            assert "half_done" not in await conn.run_sync(_tables)
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns("listings")}
            )
        assert "extra" not in columns
    finally:
        await engine.dispose()


async def test_downgrade_to_base_and_up_again(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        await migrate.upgrade(engine)
        await migrate.downgrade(engine, "base")
        async with engine.connect() as conn:
            left = await conn.run_sync(_tables)
        assert left <= {migrate.VERSION_TABLE}
        assert await migrate.current(engine) is None
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


def _columns(connection: Connection, name: str) -> set[str]:
    return {col["name"] for col in inspect(connection).get_columns(name)}


async def test_0003_down_and_up_keeps_listings_and_leaves_old_rows_unrendered(
    database_url: str,
) -> None:
    """Down to 0002: the reports, the settings and the rendered descriptions go, the
    listings stay. Up again: the listing written before 0003 has no rendered description
    (the page renders it), a new one has; the schema is the declared one."""
    from duet_p2p.identity import Identity
    from duet_p2p.registry.listing import ListingSpec
    from registry_server.reports import ReportStore

    host = Identity.generate()

    def spec(name: str) -> ListingSpec:
        return ListingSpec.new(
            host, kind="dataset", name=name, summary="s", description="*old*", license="MIT",
            signaling_url="http://127.0.0.1:9/", modality="tabular", keywords=["k"],
            schema=[{"name": "a", "dtype": "int64"}], access_modes=["live"],
        )  # fmt: skip

    engine = make_engine(database_url)
    try:
        await migrate.upgrade(engine)
        old = spec("Old")
        await RegistryStore(engine).publish(old.sign(host).to_wire())
        await ReportStore(engine).add(old.listing_id, "spam", "x", "127.0.0.1")
        await migrate.downgrade(engine, "0002")
        assert await migrate.current(engine) == "0002"
        async with engine.connect() as conn:
            tables = await conn.run_sync(_tables)
            columns = await conn.run_sync(_columns, "listings")
        assert "reports" not in tables and "registry_settings" not in tables
        assert "description_html" not in columns and "wire" in columns
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
        store = RegistryStore(engine)
        stored = await store.get(old.listing_id)
        assert stored is not None and stored.description_html is None
        assert await ReportStore(engine).count() == 0
        new = spec("New")
        await store.publish(new.sign(host).to_wire())
        fresh = await store.get(new.listing_id)
        assert fresh is not None and fresh.description_html == "<p><em>old</em></p>\n"
        assert await store.keep_description_html(old.listing_id, 1, "<p>kept</p>")
        assert not await store.keep_description_html(old.listing_id, 1, "<p>again</p>")
        kept = await store.get(old.listing_id)
        assert kept is not None and kept.description_html == "<p>kept</p>"
    finally:
        await engine.dispose()


def test_no_offline_mode() -> None:
    config = Config()
    config.set_main_option("script_location", str(migrate.MIGRATIONS))
    config.set_main_option("path_separator", "os")
    with pytest.raises(RuntimeError, match="migrate.upgrade"):
        command.upgrade(config, "head", sql=True)
    with pytest.raises(RuntimeError, match="migrate.upgrade"):
        command.upgrade(config, "head")  # no connection given


async def test_a_database_from_a_newer_registry_is_refused(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        await migrate.upgrade(engine)
        async with engine.begin() as conn:
            await conn.execute(update(VERSIONS).values(version_num="0099"))
        with pytest.raises(CommandError, match="0099"):
            await migrate.upgrade(engine)
        assert await migrate.current(engine) == "0099"
    finally:
        await engine.dispose()


async def test_an_unmigrated_database_is_not_usable(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with pytest.raises(Exception, match="listings"):
            await RegistryStore(engine).search("", now=1.0)
    finally:
        await engine.dispose()


def test_migrations_ship_with_the_package() -> None:
    versions = sorted(p.name for p in (migrate.MIGRATIONS / "versions").glob("*.py"))
    assert versions == ["0001_listings.py", "0002_inbox.py", "0003_reports_and_rendered.py"]
    assert (migrate.MIGRATIONS / "env.py").is_file()
    assert not (ROOT / "alembic.ini").exists()


def test_importing_migrate_does_not_import_torch() -> None:
    code = (
        "import sys, registry_server.migrate, registry_server.db_inbox; "
        "assert 'torch' not in sys.modules, 'torch'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
