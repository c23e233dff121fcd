"""The exceptions module: its public names, its hierarchy, and advice a volunteer can act on; then every error
a volunteer can meet, met through the `hivewire` command."""

from __future__ import annotations

import inspect
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from typer.testing import CliRunner, Result

from hivewire import errors
from hivewire.cli import CliState, app
from hivewire.config import CredentialStore
from hivewire.identity import decode_peer_key, peer_id_from_key
from hivewire_server.main import create_app
from tests.client._fakes import RUN as FAKE_RUN
from tests.client._fakes import SERVER as FAKE_SERVER
from tests.client.test_api import join_body
from tests.client.test_cli import TOKEN as FAKE_TOKEN
from tests.client.test_cli import FakeServer
from tests.conftest import RUN, Account, make_settings, new_user
from tests.server.test_join import new_peer_key
from tests.support import LOOPBACK, free_port


def exception_classes() -> list[type[errors.HivewireError]]:
    return [
        value for value in vars(errors).values() if inspect.isclass(value) and issubclass(value, errors.HivewireError)
    ]


def test_all_is_sorted_and_complete() -> None:
    assert errors.__all__ == sorted(errors.__all__)
    assert set(errors.__all__) == {cls.__name__ for cls in exception_classes()}


def test_every_exception_is_drawn_in_the_docstring() -> None:
    assert errors.__doc__ is not None
    for cls in exception_classes():
        assert cls.__name__ in errors.__doc__


def test_every_exception_carries_one_sentence_of_advice() -> None:
    for cls in exception_classes():
        assert cls.advice.endswith("."), cls
        assert len(cls.advice) < 120, cls


def test_advice_can_be_overridden_per_instance() -> None:
    error = errors.ConfigError("bad", advice="Do this instead.")
    assert (str(error), error.advice) == ("bad", "Do this instead.")
    assert errors.ConfigError("bad").advice == errors.ConfigError.advice


def test_banned_is_forbidden() -> None:
    assert issubclass(errors.Banned, errors.Forbidden)
    assert issubclass(errors.Forbidden, errors.APIError)


# ---------------------------------------------------------------------------------------------- through the CLI
# Every error a volunteer can meet, one by one, through the `hivewire` command against the real server (in
# this process, on loopback) where it can produce the case: exit status 1, no traceback, and on stderr exactly
# the error and one sentence of advice.


@dataclass
class LiveServer:
    url: str
    http: httpx.Client
    organizer: Account
    volunteer: Account

    def create_run(self, slug: str, **fields: object) -> str:
        response = self.http.post("/api/runs", json={**RUN, "slug": slug, **fields}, headers=self.organizer.headers)
        assert response.status_code == 201, response.text
        return f"{self.url}/runs/{slug}"


@pytest.fixture(scope="module")
def silent_udp() -> Iterator[int]:
    """A UDP port that takes packets and never answers: a STUN server behind a firewall that drops UDP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((LOOPBACK, 0))
        yield int(sink.getsockname()[1])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path, silent_udp: int) -> Iterator[LiveServer]:
    database = tmp_path_factory.mktemp("errors") / "hivewire.db"
    shutil.copy(sqlite_template, database)
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    settings = make_settings(
        f"sqlite:///{database}", public_url=url, stun_urls=[f"stun:{LOOPBACK}:{silent_udp}"], turn_urls=[]
    )
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=LOOPBACK, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"uvicorn did not start on {url}"
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=url, timeout=10.0) as http:
            organizer = new_user(http, "olivia")  # type: ignore[arg-type]  # has the calls new_user makes
            volunteer = new_user(http, "victor")  # type: ignore[arg-type]
            yield LiveServer(url, http, organizer, volunteer)
    finally:
        server.should_exit = True
        thread.join(10.0)


def hivewire(home: Path, *args: str, transport: httpx.BaseTransport | None = None) -> Result:
    return CliRunner().invoke(app, ["--home", str(home), *args], obj=CliState(transport=transport))


def signed_in_as(home: Path, server: str, account: Account) -> Path:
    CredentialStore(home / "credentials.json").store(server, account.token)
    return home


def assert_advice(result: Result, advice: str, error: str = "") -> None:
    """Exit status 1, and stderr is `Error: ...` then exactly the expected sentence of advice."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("Error: ") and error in lines[0], lines
    assert lines[1] == advice
    assert advice.endswith(".") and ". " not in advice.rstrip("."), "one sentence"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("HIVEWIRE_SERVER", "HIVEWIRE_TOKEN", "HIVEWIRE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def test_server_unreachable(home: Path) -> None:
    closed = f"http://{LOOPBACK}:{free_port()}"
    CredentialStore(home / "credentials.json").store(closed, "hw_" + "t" * 43)
    assert_advice(hivewire(home, "whoami", "--server", closed), errors.ServerUnreachable.advice, "cannot reach")


def test_not_signed_in(home: Path, live: LiveServer) -> None:
    run_url = live.create_run("not-signed-in")
    assert_advice(hivewire(home, "join", run_url, "--dry-run"), errors.NotSignedIn.advice, "not signed in")


def test_token_revoked(home: Path, live: LiveServer) -> None:
    victor = live.volunteer.headers
    made = live.http.post("/api/tokens", json={"name": "laptop"}, headers=victor).json()
    assert live.http.delete(f"/api/tokens/{made['id']}", headers=victor).status_code == 200
    CredentialStore(home / "credentials.json").store(live.url, made["token"])
    assert_advice(hivewire(home, "whoami"), errors.AuthenticationFailed.advice, "did not accept the stored token")


def test_unknown_run(home: Path, live: LiveServer) -> None:
    signed_in_as(home, live.url, live.volunteer)
    result = hivewire(home, "join", f"{live.url}/runs/no-such-run", "--dry-run")
    assert_advice(result, errors.NotFound.advice, "no run named 'no-such-run'")


def test_run_full(home: Path, live: LiveServer) -> None:
    run_url = live.create_run("full-run", max_peers=1)
    joined = live.http.post(
        "/api/runs/full-run/join", json={"peer_key": new_peer_key()[1]}, headers=live.organizer.headers
    )
    assert joined.status_code == 200, joined.text
    signed_in_as(home, live.url, live.volunteer)
    assert_advice(hivewire(home, "join", run_url, "--dry-run"), errors.RunFull.advice, "is full")


def test_run_closed(home: Path, live: LiveServer) -> None:
    run_url = live.create_run("closed-run")
    live.http.patch("/api/runs/closed-run", json={"status": "closed"}, headers=live.organizer.headers)
    signed_in_as(home, live.url, live.volunteer)
    assert_advice(hivewire(home, "join", run_url, "--dry-run"), errors.RunClosed.advice, "is closed")


def test_not_on_the_allowlist(home: Path, live: LiveServer) -> None:
    run_url = live.create_run("invited-only", join_policy="allowlist")
    signed_in_as(home, live.url, live.volunteer)
    assert_advice(hivewire(home, "join", run_url, "--dry-run"), errors.Forbidden.advice, "only invited")


def test_banned(home: Path, live: LiveServer) -> None:
    run_url = live.create_run("no-spam")
    body = {"user_id": live.volunteer.id, "reason": "spam"}
    assert live.http.post("/api/runs/no-spam/bans", json=body, headers=live.organizer.headers).status_code == 201
    signed_in_as(home, live.url, live.volunteer)
    assert_advice(hivewire(home, "join", run_url, "--dry-run"), errors.Banned.advice, "banned")


def test_recipe_missing(home: Path, live: LiveServer) -> None:
    run_url = live.create_run("exotic", recipe="exotic-model", recipe_version="3")
    signed_in_as(home, live.url, live.volunteer)
    result = hivewire(home, "join", run_url, "--dry-run")
    assert_advice(result, "Install the package that provides recipe exotic-model version 3.", "exotic-model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable CUDA GPU")
def test_no_gpu(home: Path, live: LiveServer) -> None:
    """Refused before the join: no key is made, no request is sent."""
    run_url = live.create_run("wants-a-gpu")
    signed_in_as(home, live.url, live.volunteer)
    result = hivewire(home, "join", run_url, "--device", "cuda", "--dry-run")
    # A CPU-only PyTorch (as in CI) gets the advice to install a CUDA build; a CUDA build without a GPU the default.
    advice = errors.DeviceUnavailable.advice if torch.version.cuda else errors.NO_CUDA_BUILD_ADVICE
    assert_advice(result, advice, "--device cuda")
    assert not (home / "peer_key.pem").exists()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:0:1"])
def test_not_a_device(home: Path, device: str) -> None:
    result = hivewire(home, "join", f"http://{LOOPBACK}:9/runs/any-run", "--device", device)
    assert_advice(result, errors.DeviceUnavailable.advice, "is not a torch device")


@pytest.mark.parametrize(
    ("device", "error"),
    [("meta", "holds no data"), ("mps", "no Apple GPU"), ("xpu", "--device xpu: ")],
)
def test_devices_this_computer_lacks_are_named_in_one_line(home: Path, device: str, error: str) -> None:
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this computer has an Apple GPU")
    if device == "xpu" and torch.xpu.is_available():
        pytest.skip("this computer has an Intel GPU")
    result = hivewire(home, "join", f"http://{LOOPBACK}:9/runs/any-run", "--device", device)
    assert_advice(result, errors.DeviceUnavailable.advice, error)
    assert len(result.stderr.splitlines()[0]) < 300


class ClockSkewedServer(FakeServer):
    """Answers a join with a certificate whose times say this computer's clock is off by an hour."""

    def __init__(self, *, iat: int, exp: int) -> None:
        super().__init__()
        self.times = {"iat": iat, "exp": exp}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != f"/api/runs/{FAKE_RUN}/join":
            return super().__call__(request)
        peer_key = decode_peer_key(json.loads(request.content)["peer_key"])
        certificate = self.key.mint(peer_key, **self.times)
        return httpx.Response(200, json=join_body(certificate=certificate, peer_id=peer_id_from_key(peer_key)))


@pytest.mark.parametrize(
    ("offset_s", "reason"),
    [(-7200, "expired"), (3600, "issued in the future")],
    ids=["expired", "future"],
)
def test_certificate_times_point_at_the_clock(home: Path, offset_s: int, reason: str) -> None:
    now = int(time.time())
    server = ClockSkewedServer(iat=now + offset_s, exp=now + offset_s + 600)
    CredentialStore(home / "credentials.json").store(FAKE_SERVER, FAKE_TOKEN)
    result = hivewire(
        home, "join", f"{FAKE_SERVER}/runs/{FAKE_RUN}", "--dry-run", transport=httpx.MockTransport(server)
    )
    assert_advice(result, errors.CLOCK_ADVICE, f"invalid peer certificate: {reason}")


def test_other_certificate_failures_keep_the_general_advice() -> None:
    assert errors.CertificateError("bad signature").advice == errors.CertificateError.advice


@pytest.mark.slow
def test_nat_blocks_udp(home: Path, live: LiveServer, silent_udp: int) -> None:
    """`hivewire doctor` where the STUN server's UDP answers never come: step 3 fails with its advice."""
    run_url = live.create_run("udp-check")
    signed_in_as(home, live.url, live.volunteer)
    result = hivewire(home, "doctor", run_url, "--json", "--host-address", LOOPBACK)
    assert result.exit_code == 1, result.output
    nat = next(check for check in json.loads(result.stdout)["checks"] if check["step"] == "nat")
    assert nat["summary"] == f"the STUN server {LOOPBACK}:{silent_udp} did not answer over UDP"
    advice = nat["advice"]
    assert advice.startswith("UDP to the STUN server is blocked: allow outbound UDP")
    assert advice.endswith(".") and ". " not in advice.rstrip(".")
