"""Schema only through Alembic: upgrade head on an empty database, downgrade base back, on both backends."""

import asyncio

from sqlalchemy import inspect

from hivewire_server.core.db import create_engine
from hivewire_server.core.migrate import downgrade, upgrade
from hivewire_server.models import Base
from tests.conftest import _postgres_admin, _postgres_url

EXPECTED_TABLES = {
    "users",
    "identities",
    "api_tokens",
    "device_codes",
    "runs",
    "memberships",
    "peers",
    "reports",
    "rounds",
    "round_members",
    "verification_failures",
    "signing_keys",
}


def table_names(database_url: str) -> set[str]:
    async def read() -> set[str]:
        engine = create_engine(database_url)
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        await engine.dispose()
        return names - {"alembic_version"}

    return asyncio.run(read())


def check_round_trip(database_url: str) -> None:
    upgrade(database_url)
    assert table_names(database_url) == EXPECTED_TABLES == {table.name for table in Base.metadata.sorted_tables}
    downgrade(database_url)
    assert table_names(database_url) == set()
    upgrade(database_url)
    assert table_names(database_url) == EXPECTED_TABLES


def test_sqlite_upgrade_downgrade(tmp_path) -> None:
    check_round_trip(f"sqlite:///{tmp_path / 'fresh.db'}")


def test_postgresql_upgrade_downgrade() -> None:
    name = "hw_migration_test"
    _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    try:
        check_round_trip(_postgres_url(name))
    finally:
        _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_models_match_the_migrations(tmp_path) -> None:
    """Autogenerate finds nothing to do: every model change came with a migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    database_url = f"sqlite:///{tmp_path / 'compare.db'}"
    upgrade(database_url)

    async def diff() -> list[object]:
        engine = create_engine(database_url)
        async with engine.connect() as connection:
            result = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
            )
        await engine.dispose()
        return result

    assert asyncio.run(diff()) == []
