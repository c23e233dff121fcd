"""Shared fixtures: a migrated database per test (SQLite and PostgreSQL), the server app, and users.

PostgreSQL comes from HIVEWIRE_TEST_POSTGRES_URL (default: the local server on 127.0.0.1:5432). Each test
gets its own database cloned from a migrated template, so tests neither share state nor pay for migrations."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.core.config import Settings
from hivewire_server.core.migrate import upgrade
from hivewire_server.main import create_app
from hivewire_server.models import Base

POSTGRES_URL = os.environ.get("HIVEWIRE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
PASSWORD = "correct horse battery staple"
TURN_SECRET = "test-turn-secret-0123456789abcdef"
T = TypeVar("T")


def _postgres_url(database: str) -> str:
    return make_url(POSTGRES_URL).set(database=database).render_as_string(hide_password=False)


def _postgres_admin(*statements: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("db") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """One migrated database for the session; tests empty its tables instead of paying ~0.5 s for a new one."""
    name = f"hw_test_{os.getpid()}"
    try:
        _postgres_admin(f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
    except OSError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc}); start it or set HIVEWIRE_TEST_POSTGRES_URL"
        )
    upgrade(_postgres_url(name))
    yield _postgres_url(name)
    _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _empty_postgres_tables(url: str) -> None:
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)

    async def run() -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        finally:
            await connection.close()

    asyncio.run(run())


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database for one test, on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "hivewire.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_database")
    _empty_postgres_tables(url)
    yield url


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "public_url": "http://testserver",
        "session_secret": "test-session-secret-0123456789abcdef",
        "stun_urls": ["stun:127.0.0.1:3478"],
        "turn_urls": ["turn:127.0.0.1:3478?transport=udp"],
        "turn_secret": TURN_SECRET,
        "certificate_lifetime_seconds": 600,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@dataclass
class Account:
    id: int
    email: str
    token: str
    is_organizer: bool

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def new_user(client: TestClient, name: str) -> Account:
    """Signs a user up, mints an API token, and leaves the client's cookie jar empty again."""
    email = f"{name}@example.org"
    response = client.post("/api/auth/signup", json={"email": email, "password": PASSWORD, "display_name": name})
    assert response.status_code == 201, response.text
    body = response.json()
    token = client.post("/api/tokens", json={"name": "test"}).json()["token"]
    client.cookies.clear()
    return Account(id=body["id"], email=email, token=token, is_organizer=body["is_organizer"])


@pytest.fixture
def organizer(client: TestClient) -> Account:
    user = new_user(client, "olivia")
    assert user.is_organizer, "the first user of a fresh server is an organizer"
    return user


@pytest.fixture
def volunteer(client: TestClient, organizer: Account) -> Account:
    user = new_user(client, "victor")
    assert not user.is_organizer
    return user


RUN = {
    "slug": "tiny-lm-demo",
    "name": "Tiny LM demo",
    "description": "A small language model",
    "recipe": "tiny-lm",
    "strategy": "dedloc",
    "target_batch_size": 4096,
    "group_size": 8,
    "compression": "fp16",
}


@pytest.fixture
def run_slug(client: TestClient, organizer: Account) -> str:
    response = client.post("/api/runs", json=RUN, headers=organizer.headers)
    assert response.status_code == 201, response.text
    return RUN["slug"]


def run_in_app(client: TestClient, action: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Runs `action(session)` on the app's own event loop and database: how tests move time or inspect rows."""

    async def call() -> T:
        async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
            result = await action(session)
            await session.commit()
            return result

    assert client.portal is not None, "use the client inside its `with` block"
    return client.portal.call(call)
