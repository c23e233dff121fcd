"""Fixtures of the client tests that need the real server running in its own process."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.client.live_server import Server


@pytest.fixture
def server(sqlite_template: Path, tmp_path: Path) -> Iterator[Server]:
    database = tmp_path / "hivewire.db"
    shutil.copy(sqlite_template, database)
    running = Server(database, tmp_path / "server.log")
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        yield client
