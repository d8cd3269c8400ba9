"""Alembic's environment for the registry: run on the connection given by
:func:`registry_server.migrate.upgrade` (``config.attributes["connection"]``), inside the
transaction it holds; there is no offline (``--sql``) mode."""

from __future__ import annotations

from alembic import context

from registry_server.migrate import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("run the registry's migrations with registry_server.migrate.upgrade")

context.configure(
    connection=connection,
    version_table=VERSION_TABLE,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
