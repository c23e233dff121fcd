"""Two server replicas (real uvicorn processes) sharing one PostgreSQL database and Redis: a peer connected to
each sees the other in presence and samples, and signal envelopes cross from one replica to the other."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect

from hivewire_server.core.migrate import upgrade
from tests.conftest import RUN, _postgres_admin, _postgres_url, new_user
from tests.server.test_join import join
from tests.support import free_port

REDIS_URL = os.environ.get("HIVEWIRE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START_TIMEOUT_SECONDS = 20.0  # a replica that does not answer /healthz by then has failed to start
EXCHANGE_TIMEOUT_SECONDS = 10.0  # guards against a hang; the exchange itself takes a fraction of a second
SESSION_SECRET = "replica-test-session-secret-0123456789"

pytestmark = pytest.mark.slow


@pytest.fixture
def replica_database() -> Iterator[str]:
    """A dedicated, migrated PostgreSQL database, dropped afterwards even when the test fails."""
    name = f"hw_replicas_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        _postgres_admin(f'CREATE DATABASE "{name}"')
    except OSError as exc:
        pytest.fail(f"PostgreSQL is not reachable ({exc}); start it or set HIVEWIRE_TEST_POSTGRES_URL")
    try:
        upgrade(_postgres_url(name))
        yield _postgres_url(name)
    finally:
        _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def run_slug() -> Iterator[str]:
    """A run name of its own: channels and presence keys carry it, so parallel test runs share no Redis state."""
    slug = f"replicas-{secrets.token_hex(6)}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); start it or set HIVEWIRE_TEST_REDIS_URL")
    try:
        yield slug
    finally:
        client.delete(f"hivewire:presence:{slug}")
        client.close()


def _wait_healthy(base: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"replica {base} did not start (exit code {process.poll()}):\n{log.read_text()[-3000:]}")


@contextmanager
def replicas(database_url: str, count: int, logs: Path) -> Iterator[list[str]]:
    """`count` server processes on loopback, stopped (killed if need be) however the test ends."""
    ports = [free_port() for _ in range(count)]
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "PUBLIC_URL": f"http://127.0.0.1:{ports[0]}",  # one issuer: certificates are valid on every replica
        "SESSION_SECRET": SESSION_SECRET,
        "REDIS_URL": REDIS_URL,
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            with (logs / f"replica-{port}.log").open("wb") as log:
                command = [sys.executable, "-m", "hivewire_server.cli", "serve", "--no-migrate", "--port", str(port)]
                processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        for base, process, port in zip(bases, processes, ports, strict=True):
            _wait_healthy(base, process, logs / f"replica-{port}.log")
        yield bases
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def receive(socket: ClientConnection) -> dict[str, Any]:
    return json.loads(await socket.recv())  # type: ignore[no-any-return]


async def exchange(one: str, two: str, slug: str, a: dict[str, Any], b: dict[str, Any]) -> None:
    path = f"/api/runs/{slug}/signal"
    bearer = {"Authorization": f"Bearer {a['certificate']}"}
    async with (
        asyncio.timeout(EXCHANGE_TIMEOUT_SECONDS),
        connect(f"ws{one.removeprefix('http')}{path}", additional_headers=bearer) as peer_a,
    ):
        assert (await receive(peer_a))["peers"] == []
        async with connect(f"ws{two.removeprefix('http')}{path}") as peer_b:
            await peer_b.send(json.dumps({"type": "auth", "certificate": b["certificate"]}))
            welcome = await receive(peer_b)
            assert welcome["peer_id"] == b["peer_id"] and welcome["peers"] == [a["peer_id"]]
            assert await receive(peer_a) == {"type": "presence", "peer_id": b["peer_id"], "state": "joined"}
            await peer_a.send(json.dumps({"type": "peers"}))
            assert await receive(peer_a) == {"type": "initial_peers", "peers": [b["peer_id"]]}

            payload = '{"sdp": "v=0\\r\\n", "n": 1.0E+2}'
            await peer_a.send(f'{{"type": "signal", "to": "{b["peer_id"]}", "kind": "offer", "payload": {payload}}}')
            relayed = await peer_b.recv()
            assert isinstance(relayed, str) and relayed.endswith(f'"payload": {payload}}}')
            assert json.loads(relayed)["from"] == a["peer_id"]
            await peer_b.send(json.dumps({"type": "signal", "to": a["peer_id"], "kind": "answer", "payload": None}))
            answer = await receive(peer_a)
            assert (answer["from"], answer["kind"], answer["payload"]) == (b["peer_id"], "answer", None)
        assert await receive(peer_a) == {"type": "presence", "peer_id": b["peer_id"], "state": "left"}


def test_peers_on_two_replicas_see_and_signal_each_other(replica_database: str, run_slug: str, tmp_path: Path) -> None:
    with replicas(replica_database, 2, tmp_path) as (one, two):
        with httpx.Client(base_url=one) as http:
            organizer = new_user(http, "olivia")  # type: ignore[arg-type]
            response = http.post("/api/runs", json={**RUN, "slug": run_slug}, headers=organizer.headers)
            assert response.status_code == 201, response.text
            a = join(http, organizer, run_slug)  # type: ignore[arg-type]
            b = join(http, new_user(http, "victor"), run_slug)  # type: ignore[arg-type]
        asyncio.run(exchange(one, two, run_slug, a, b))
