"""The client against the real server app (SQLite and PostgreSQL, from tests/conftest.py): device login,
token login, whoami, runs, and join with a server-minted certificate through `CertificateVerifier`."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from typer.testing import CliRunner, Result

from hivewire.api import HivewireAPI
from hivewire.cli import CliState, app
from hivewire.identity import CertificateVerifier, load_or_create_identity
from hivewire.login import wait_for_token
from hivewire_server.models import DeviceCode
from tests.client._bridge import AppTransport
from tests.conftest import Account, run_in_app

SERVER = "http://testserver"


def hivewire(client: TestClient, home: Path, *args: str) -> Result:
    state = CliState(transport=AppTransport(client))
    return CliRunner().invoke(app, ["--home", str(home), *args], obj=state)


def test_token_login_whoami_runs_and_join(
    client: TestClient, volunteer: Account, run_slug: str, tmp_path: Path
) -> None:
    result = hivewire(client, tmp_path, "login", SERVER, "--token", volunteer.token)
    assert result.exit_code == 0, result.output
    assert f"Signed in to {SERVER} as {volunteer.email}" in result.stdout

    result = hivewire(client, tmp_path, "whoami")
    assert result.exit_code == 0, result.output
    assert f"<{volunteer.email}> (user {volunteer.id})" in result.stdout

    result = hivewire(client, tmp_path, "runs")
    assert result.exit_code == 0, result.output
    assert f"hivewire join {SERVER}/runs/{run_slug}" in result.stdout

    for _ in range(2):  # joining again keeps the peer id
        result = hivewire(client, tmp_path, "join", f"{SERVER}/runs/{run_slug}", "--dry-run")
        assert result.exit_code == 0, result.output
        assert f"peer id      {load_or_create_identity(tmp_path / 'peer_key.pem').peer_id}" in result.stdout
        assert "ICE servers  stun, turn" in result.stdout


def test_server_certificate_passes_the_verifier(
    client: TestClient, volunteer: Account, run_slug: str, tmp_path: Path
) -> None:
    identity = load_or_create_identity(tmp_path / "peer_key.pem")
    transport = AppTransport(client)
    with HivewireAPI(SERVER, volunteer.token, transport=transport) as api:
        joined = api.join(run_slug, identity.peer_key)
        certificate = CertificateVerifier(SERVER, http=api.http).verify(joined.certificate, run=run_slug)
    assert certificate.peer_key == identity.public_key_raw
    assert certificate.peer_id == joined.peer_id == identity.peer_id
    assert certificate.user_id == volunteer.id
    assert certificate.expires_at == joined.certificate_expires_at


def test_the_runs_diloco_parameters_reach_the_client(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str, tmp_path: Path
) -> None:
    """What the organizer sets is what every volunteer's client reads, in the run list and the join answer."""
    changes = {"strategy": "diloco", "inner_steps": 125, "overlap": False}
    assert client.patch(f"/api/runs/{run_slug}", json=changes, headers=organizer.headers).status_code == 200
    identity = load_or_create_identity(tmp_path / "peer_key.pem")
    with HivewireAPI(SERVER, volunteer.token, transport=AppTransport(client)) as api:
        (listed,) = api.runs().data
        joined = api.join(run_slug, identity.peer_key).run
    for spec in (listed, joined):
        assert (spec.strategy, spec.inner_steps, spec.overlap) == ("diloco", 125, False)


def test_device_login_polls_until_approved(client: TestClient, volunteer: Account) -> None:
    api = HivewireAPI(SERVER, transport=AppTransport(client))
    code = api.device_code()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        """Stands in for waiting: moves the server's view of the last poll back, approves on the 2nd wait."""
        sleeps.append(seconds)

        async def rewind(session: AsyncSession) -> None:
            for row in await session.scalars(select(DeviceCode)):
                row.last_polled_at = row.last_polled_at and row.last_polled_at - timedelta(seconds=seconds)

        run_in_app(client, rewind)
        if len(sleeps) == 2:
            approval = {"user_code": code.user_code, "approve": True}
            client.post("/api/device/approve", json=approval, headers=volunteer.headers).raise_for_status()

    token = wait_for_token(api, code, sleep=sleep)
    assert sleeps == [code.interval, code.interval]
    with HivewireAPI(SERVER, token, transport=AppTransport(client)) as signed_in:
        assert signed_in.me().id == volunteer.id
