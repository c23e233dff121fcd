"""A real OpenID provider (npm oidc-provider, tests/oidc/provider.mjs) on a free loopback port.

Use it with `pytest_plugins = ["tests.oidc_fixture"]`. The provider knows two confidential clients, `web`
and `other`, both redirecting to REDIRECT_URI; accounts exist for any id, with email `<id>@example.org`."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import free_port

OIDC_DIR = Path(__file__).parent / "oidc"
REDIRECT_URI = "http://testserver/auth/test/callback"  # the app under TestClient, provider name `test`
CLIENT_SECRET = "test-oidc-client-secret-0123456789"
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class OidcProvider:
    issuer: str
    client_id: str
    client_secret: str
    other_client_id: str
    redirect_uri: str

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"


def _wait_for_discovery(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the OpenID provider exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"the OpenID provider did not answer {url} within {START_TIMEOUT_SECONDS} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("`node` is not installed: the OpenID provider tests need Node.js 20+")
    if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("tests/oidc/node_modules is missing: run scripts/setup.sh --test")
    port = free_port()
    log = tmp_path_factory.mktemp("oidc") / "provider.log"
    env = {"PATH": "", "OIDC_REDIRECT_URI": REDIRECT_URI, "OIDC_CLIENT_SECRET": CLIENT_SECRET}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [node, str(OIDC_DIR / "provider.mjs"), str(port)], cwd=OIDC_DIR, env=env, stdout=sink, stderr=sink
        )
    try:
        issuer = f"http://127.0.0.1:{port}"
        _wait_for_discovery(process, f"{issuer}/.well-known/openid-configuration", log)
        yield OidcProvider(
            issuer=issuer,
            client_id="web",
            client_secret=CLIENT_SECRET,
            other_client_id="other",
            redirect_uri=REDIRECT_URI,
        )
        crashed = process.poll()
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert crashed is None, f"the OpenID provider died during the tests ({crashed}):\n{log.read_text()}"
