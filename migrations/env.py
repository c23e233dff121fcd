"""Alembic environment: runs migrations on the async engine the server itself uses."""

from __future__ import annotations

import asyncio
import logging

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from hivewire_server.core.db import create_engine
from hivewire_server.core.migrate import MIGRATION_LOCK_KEY
from hivewire_server.models import Base

target_metadata = Base.metadata
log = logging.getLogger("hivewire.migrate")


def _serialize_migrators(connection: Connection) -> None:
    """PostgreSQL: hold a transaction-scoped advisory lock, so replicas that start together migrate one at a
    time; the first one migrates, the others then read the new revision and find nothing to do. SQLite needs
    none: it is the single-process default (replicas share PostgreSQL), so only one server migrates it."""
    if connection.dialect.name != "postgresql":
        return
    query = "SELECT pg_try_advisory_xact_lock(:key)"
    if not connection.execute(text(query), {"key": MIGRATION_LOCK_KEY}).scalar_one():
        log.info("another server is migrating this database; waiting for it to finish")
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        # Inside the migrations' transaction, before they read the current revision; released at commit.
        _serialize_migrators(connection)
        context.run_migrations()


async def _run_online(database_url: str) -> None:
    engine = create_engine(database_url)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


def main() -> None:
    database_url = context.config.attributes.get("database_url")
    if not database_url:
        raise RuntimeError("run migrations through hivewire_server.core.migrate, which passes the database URL")
    if context.is_offline_mode():
        raise RuntimeError("offline (SQL script) migrations are not supported")
    asyncio.run(_run_online(database_url))


main()
