"""Alembic driven from code, so `hivewire-server migrate` works from an installed package without alembic.ini."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import hivewire_server.migrations

# PostgreSQL advisory lock key that serializes concurrent `migrate` runs (migrations/env.py): the ASCII bytes of
# "hivewire" as one signed 64-bit integer, unlikely to collide with another application's keys.
MIGRATION_LOCK_KEY = int.from_bytes(b"hivewire", "big")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(hivewire_server.migrations.__file__).parent))
    # Passed as an attribute, not a main option: ConfigParser would mangle '%' in passwords.
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
