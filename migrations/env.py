"""Alembic environment: runs migrations on the async engine the server itself uses."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from hivewire_server.core.db import create_engine
from hivewire_server.models import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
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
