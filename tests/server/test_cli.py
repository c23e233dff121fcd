"""`hivewire-server`: the start-up sequence the container runs (wait for the database, migrate, serve),
run here as real processes, and the administrative commands."""

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from hivewire_server.cli import _parser, main
from hivewire_server.core.migrate import MIGRATION_LOCK_KEY
from tests.conftest import PASSWORD, _postgres_admin, _postgres_url
from tests.support import free_port

SERVER = [sys.executable, "-m", "hivewire_server.cli"]
REPO = Path(__file__).resolve().parents[2]


def wait_for_health(url: str, process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited during start-up"
        try:
            return httpx.get(f"{url}/healthz", timeout=1.0)
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"no answer from {url} within {timeout_s} s")


@pytest.fixture
def postgres_env() -> dict[str, str]:
    name = "hw_cli_test"
    _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    yield {**os.environ, "DATABASE_URL": _postgres_url(name), "LOG_LEVEL": "WARNING"}
    _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_container_start_up_sequence_on_postgresql(postgres_env: dict[str, str]) -> None:
    port = free_port()
    env = {**postgres_env, "PUBLIC_URL": f"http://127.0.0.1:{port}"}
    subprocess.run([*SERVER, "wait-for-db", "--timeout", "10"], env=env, check=True)
    subprocess.run([*SERVER, "migrate"], env=env, check=True)
    process = subprocess.Popen([*SERVER, "serve", "--no-migrate", "--port", str(port)], env=env)
    try:
        response = wait_for_health(f"http://127.0.0.1:{port}", process)
        assert response.json() == {"status": "ok", "database": "ok"}
        signup = httpx.post(
            f"http://127.0.0.1:{port}/api/auth/signup",
            json={"email": "root@example.org", "password": PASSWORD, "display_name": "Root"},
        )
        assert signup.status_code == 201
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_wait_for_db_gives_up_with_a_clear_message() -> None:
    env = {**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none", "LOG_LEVEL": "ERROR"}
    result = subprocess.run([*SERVER, "wait-for-db", "--timeout", "1"], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "database not reachable after 1 s" in result.stderr


def test_make_organizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    database_url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("LOG_LEVEL", "WARNING")
    main(["migrate"])
    with pytest.raises(SystemExit):
        main(["make-organizer", "nobody@example.org"])
    assert "no user with email nobody@example.org" in capsys.readouterr().err


def test_replicas_starting_together_migrate_once(postgres_env: dict[str, str]) -> None:
    """Two `migrate` processes at once on one PostgreSQL database: both wait on the advisory lock (held here
    first, so they surely overlap), then one applies the migrations and the other finds nothing to do."""
    database = make_url(postgres_env["DATABASE_URL"]).database
    env = {**postgres_env, "LOG_LEVEL": "INFO"}

    async def run() -> list[subprocess.CompletedProcess[str]]:
        holder = await asyncpg.connect(postgres_env["DATABASE_URL"])
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            processes = [
                await asyncio.create_subprocess_exec(
                    *SERVER, "migrate", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
                )
                for _ in range(2)
            ]
            waiting_query = (
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = $1"
            )
            deadline = time.monotonic() + 30.0
            while await holder.fetchval(waiting_query, database) < 2:
                assert all(process.returncode is None for process in processes), "a migrate exited without waiting"
                assert time.monotonic() < deadline, "the migrate processes never waited on the advisory lock"
                await asyncio.sleep(0.05)
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
            outputs = [await process.communicate() for process in processes]
            return [
                subprocess.CompletedProcess(["migrate"], process.returncode or 0, out.decode(), err.decode())
                for process, (out, err) in zip(processes, outputs, strict=True)
            ]
        finally:
            await holder.close()

    results = asyncio.run(run())
    assert [result.returncode for result in results] == [0, 0], [result.stderr for result in results]
    applied = [result.stderr.count("Running upgrade") for result in results]
    assert sorted(applied) == [0, len(list((REPO / "migrations" / "versions").glob("0*.py")))], applied
    assert all("another server is migrating this database" in result.stderr for result in results)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (commands,) = [action for action in _parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(commands.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_each_server_command_explains_itself_and_its_options(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([name, "--help"])
    assert exited.value.code == 0
    page = " ".join(capsys.readouterr().out.split())
    command = _subcommands()[name]
    assert command.description and len(command.description) > 20
    assert " ".join(command.description.split()) in page
    for action in command._actions:
        assert action.help, f"{name}: {action.dest} has no help"
        assert " ".join(action.help.split()) in page


def test_server_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    page = capsys.readouterr().out
    assert "docs/operations.md" in page
    assert all(name in page for name in _subcommands())
