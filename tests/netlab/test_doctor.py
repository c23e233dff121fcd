"""`hivewire doctor` in a home whose router drops all UDP: a clear "UDP blocked" verdict, exit 1, within bounds.

The real server runs in the lab's public namespace (uvicorn, SQLite prepared in-process beforehand) and
hands out the lab coturn's STUN/TURN URLs and credentials; the doctor is the installed console script,
run inside the blocked home, where HTTP (TCP) still gets through the NAT and nothing over UDP does.
"""

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hivewire.config import CredentialStore
from hivewire_server.main import create_app
from tests.conftest import RUN, make_settings, new_user
from tests.netlab.lab import PUB_IP, TURN_PORT, Lab, run, wait_for

pytestmark = pytest.mark.netlab

REPO = Path(__file__).resolve().parents[2]
SERVER_PORT = 8000
SERVER_URL = f"http://{PUB_IP}:{SERVER_PORT}"
SERVER_START_TIMEOUT_S = 20.0
SERVER_STOP_TIMEOUT_S = 10.0  # uvicorn's graceful shutdown; the lab kills what is left at module end
DOCTOR_BUDGET_S = 30.0  # the doctor's promise when every UDP probe has to time out
HIVEWIRE = Path(sys.executable).parent / "hivewire"  # the console script a volunteer runs


def _tcp_bound(ns: str, port: int) -> bool:
    return any(f":{port} " in line for line in run(["ss", "-H", "-t", "-l", "-n"], ns=ns).splitlines())


@pytest.fixture
def server_token(lab: Lab, sqlite_template: Path, tmp_path: Path) -> Iterator[str]:
    """The server in pub with the lab's TURN secret; returns a volunteer's API token for the run."""
    assert lab.turn is not None
    database = tmp_path / "hivewire.db"
    shutil.copy(sqlite_template, database)
    values = {
        "database_url": f"sqlite:///{database}",
        "public_url": SERVER_URL,
        "stun_urls": [lab.turn.stun_url],
        "turn_urls": [lab.turn.turn_url],
        "turn_secret": lab.turn.secret,
    }
    with TestClient(create_app(make_settings(**values)), base_url=SERVER_URL) as client:  # type: ignore[arg-type]
        organizer = new_user(client, "olivia")
        assert client.post("/api/runs", json=RUN, headers=organizer.headers).status_code == 201
        token = new_user(client, "victor").token
    env = [f"{name.upper()}={value if isinstance(value, str) else ','.join(value)}" for name, value in values.items()]
    command = [sys.executable, "-m", "hivewire_server.cli", "serve", "--no-migrate", "--host", PUB_IP]
    server = lab.popen(lab.pub, ["env", *env, *command, f"--port={SERVER_PORT}"], tmp_path / "server.log", cwd=REPO)
    try:
        wait_for(lambda: _tcp_bound(lab.pub, SERVER_PORT), SERVER_START_TIMEOUT_S, f"the server on {SERVER_URL}")
        yield token
    finally:  # the port is fixed: free it for the next test (the lab would only kill it at module end)
        server.terminate()
        server.wait(SERVER_STOP_TIMEOUT_S)


def test_doctor_says_udp_is_blocked(lab: Lab, server_token: str, tmp_path: Path) -> None:
    assert lab.turn is not None
    home = tmp_path / "home"
    CredentialStore(home / "credentials.json").store(SERVER_URL, server_token)
    argv = [str(HIVEWIRE), "--home", str(home), "doctor", f"{SERVER_URL}/runs/{RUN['slug']}", "--json"]
    started = time.monotonic()
    done = subprocess.run(
        ["ip", "netns", "exec", lab.homes["blocked"].ns, *argv],
        capture_output=True,
        text=True,
        timeout=DOCTOR_BUDGET_S + 10,
        check=False,
    )
    elapsed = time.monotonic() - started
    evidence = f"exit {done.returncode} after {elapsed:.1f} s\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 1, evidence
    assert elapsed < DOCTOR_BUDGET_S, evidence
    assert "Traceback" not in done.stderr, evidence
    report = json.loads(done.stdout)
    checks = {check["step"]: check for check in report["checks"]}
    assert checks["server"]["status"] == "ok", evidence
    assert checks["candidates"]["details"] == {"types": ["host"]}, evidence
    assert checks["nat"]["summary"] == f"the STUN server {PUB_IP}:{TURN_PORT} did not answer over UDP", evidence
    assert f"allow outbound UDP {TURN_PORT}" in checks["nat"]["advice"], evidence
    assert checks["turn"]["summary"] == f"{lab.turn.turn_url} did not answer over UDP {TURN_PORT}", evidence
    assert report["verdict"]["code"] == "udp-blocked", evidence
    assert report["verdict"]["can_take_part"] is False, evidence
