"""The `hivewire` commands end to end over a fake server at the transport edge (tests/contract/ uses the real
one): login (token and device flow), whoami, runs, join, logout, and errors as advice without tracebacks."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner, Result

from hivewire.cli import CliState, app
from hivewire.cli.join import parse_run_url
from hivewire.config import CredentialStore
from hivewire.errors import InvalidRunURL
from hivewire.identity import decode_peer_key, load_or_create_identity, peer_id_from_key
from tests.client._fakes import RUN, SERVER, JWKSServer, SigningKey
from tests.client.test_api import RUN_SPEC, join_body

TOKEN = "hw_" + "c" * 43
ME = {"id": 42, "email": "volunteer@example.org", "display_name": "Val", "is_organizer": False}


class FakeServer:
    """Just enough of the server for the CLI: tokens, device flow, runs, join with real certificates."""

    def __init__(self) -> None:
        self.key = SigningKey()
        self.jwks = JWKSServer(self.key)
        self.pending_polls = 1
        self.peer_key_override: bytes | None = None
        self.runs: list[dict[str, object]] = [RUN_SPEC]
        self.paths: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.paths.append(path)
        if path == "/.well-known/jwks.json":
            return self.jwks(request)
        if path == "/api/device/code":
            return httpx.Response(
                200,
                json={
                    "device_code": "dc-1",
                    "user_code": "BCDF-GHJK",
                    "verification_uri": f"{SERVER}/device",
                    "expires_in": 600,
                    "interval": 1,
                },
            )
        if path == "/api/device/token":
            if self.pending_polls:
                self.pending_polls -= 1
                return httpx.Response(400, json={"error": "authorization_pending"})
            return httpx.Response(200, json={"access_token": TOKEN, "token_type": "Bearer"})
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return httpx.Response(401, json={"detail": "sign in", "code": "unauthorized"})
        if path == "/api/me":
            return httpx.Response(200, json=ME)
        if path == "/api/runs":
            return httpx.Response(200, json={"data": self.runs, "count": len(self.runs)})
        if path == f"/api/runs/{RUN}/join":
            peer_key = decode_peer_key(json.loads(request.content)["peer_key"])
            certified = self.peer_key_override or peer_key
            body = join_body(certificate=self.key.mint(certified), peer_id=peer_id_from_key(certified))
            return httpx.Response(200, json=body)
        return httpx.Response(404, json={"detail": "no such thing", "code": "not_found"})


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("HIVEWIRE_SERVER", "HIVEWIRE_TOKEN", "HIVEWIRE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def hivewire(home: Path, server: FakeServer, *args: str, stdin: str | None = None) -> Result:
    state = CliState(transport=httpx.MockTransport(server), sleep=lambda seconds: None)
    return CliRunner().invoke(app, ["--home", str(home), *args], obj=state, input=stdin)


def signed_in(home: Path) -> None:
    CredentialStore(home / "credentials.json").store(SERVER, TOKEN)


def test_login_with_a_token_checks_and_stores_it(home: Path, server: FakeServer) -> None:
    result = hivewire(home, server, "login", SERVER, "--token", TOKEN)
    assert result.exit_code == 0, result.output
    assert f"Signed in to {SERVER} as volunteer@example.org" in result.stdout
    credentials = home / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert CredentialStore(credentials).token(SERVER) == TOKEN


def test_login_reads_the_token_from_stdin(home: Path, server: FakeServer) -> None:
    result = hivewire(home, server, "login", SERVER, "--token", "-", stdin=TOKEN + "\n")
    assert result.exit_code == 0, result.output
    assert CredentialStore(home / "credentials.json").token(SERVER) == TOKEN


def test_login_refuses_a_token_the_server_rejects(home: Path, server: FakeServer) -> None:
    result = hivewire(home, server, "login", SERVER, "--token", "hw_" + "x" * 43)
    assert result.exit_code == 1
    assert "run `hivewire login <server url>` again" in result.stderr
    assert "Traceback" not in result.output
    assert not (home / "credentials.json").exists()


def test_device_login(home: Path, server: FakeServer) -> None:
    result = hivewire(home, server, "login", SERVER, "--headless")
    assert result.exit_code == 0, result.output
    assert f"Open {SERVER}/device and enter the code BCDF-GHJK" in result.stdout
    assert server.paths.count("/api/device/token") == 2
    assert CredentialStore(home / "credentials.json").token(SERVER) == TOKEN


def test_whoami_and_runs_use_the_last_login(home: Path, server: FakeServer) -> None:
    signed_in(home)
    result = hivewire(home, server, "whoami")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Val <volunteer@example.org> (user 42) on {SERVER}"
    result = hivewire(home, server, "runs")
    assert result.exit_code == 0, result.output
    assert "tiny-lm" in result.stdout
    assert f"hivewire join {SERVER}/runs/tiny-lm" in result.stdout


def test_runs_marks_closed_runs_instead_of_offering_to_join(home: Path, server: FakeServer) -> None:
    signed_in(home)
    server.runs = [RUN_SPEC, {**RUN_SPEC, "slug": "old-run", "name": "Old", "status": "closed", "max_peers": 3}]
    result = hivewire(home, server, "runs")
    assert result.exit_code == 0, result.output
    assert f"hivewire join {SERVER}/runs/tiny-lm" in result.stdout
    assert "closed: its organizer takes no new volunteers" in result.stdout
    assert f"{SERVER}/runs/old-run" not in result.stdout


def test_commands_without_login_give_advice_and_touch_nothing(home: Path, server: FakeServer) -> None:
    advice = "Run `hivewire login <server url>` first."
    for command in (["whoami", "--server", SERVER], ["join", f"{SERVER}/runs/{RUN}"]):
        result = hivewire(home, server, *command)
        assert result.exit_code == 1
        assert result.stderr.splitlines() == [f"Error: not signed in to {SERVER}", advice]
    assert server.paths == []
    assert not (home / "peer_key.pem").exists()


def test_join_prints_a_verified_summary(home: Path, server: FakeServer) -> None:
    signed_in(home)
    result = hivewire(home, server, "join", f"{SERVER}/runs/{RUN}", "--dry-run")
    assert result.exit_code == 0, result.output
    identity = load_or_create_identity(home / "peer_key.pem")
    assert f"peer id      {identity.peer_id}" in result.stdout
    assert "ICE servers  stun, turn" in result.stdout
    assert "1 to contact first: p" + "b" * 24 in result.stdout
    assert stat.S_IMODE((home / "peer_key.pem").stat().st_mode) == 0o600
    assert "/.well-known/jwks.json" in server.paths


def test_join_refuses_a_certificate_for_another_key(home: Path, server: FakeServer) -> None:
    signed_in(home)
    server.peer_key_override = bytes(32)
    result = hivewire(home, server, "join", f"{SERVER}/runs/{RUN}")
    assert result.exit_code == 1
    assert "another peer key" in result.stderr


def test_join_an_unknown_run(home: Path, server: FakeServer) -> None:
    signed_in(home)
    result = hivewire(home, server, "join", f"{SERVER}/runs/no-such-run")
    assert result.exit_code == 1
    assert "hivewire runs" in result.stderr


def test_logout_forgets_the_token(home: Path, server: FakeServer) -> None:
    signed_in(home)
    assert hivewire(home, server, "logout").stdout.strip() == f"Signed out of {SERVER}."
    assert CredentialStore(home / "credentials.json").token(SERVER) is None
    assert hivewire(home, server, "logout", "--server", SERVER).exit_code == 0


@pytest.mark.parametrize(
    ("url", "server", "slug"),
    [
        ("http://host:8000/runs/tiny-lm", "http://host:8000", "tiny-lm"),
        ("https://Example.org/runs/tiny-lm/", "https://example.org", "tiny-lm"),
        ("https://example.org/hive/runs/big-run-2", "https://example.org/hive", "big-run-2"),
    ],
)
def test_parse_run_url(url: str, server: str, slug: str) -> None:
    assert parse_run_url(url) == (server, slug)


@pytest.mark.parametrize(
    "url", ["tiny-lm", "http://host/tiny-lm", "http://host/runs/Tiny_LM", "ftp://host/runs/tiny-lm", "http:///runs/ab"]
)
def test_parse_run_url_refuses_other_urls(url: str) -> None:
    with pytest.raises(InvalidRunURL):
        parse_run_url(url)


# ---------------------------------------------------------------------------------------------- help


def rendered(result: Result) -> str:
    """Help as one line: box drawing removed and whitespace collapsed, so wrapped text reads as written."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout).split())


def collapsed(text: str) -> str:
    return " ".join(text.split())


COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_top_level_help_describes_the_program_and_lists_every_command(home: Path) -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    page = rendered(result)
    assert "Train one model together with other volunteers, peer to peer." in page
    assert set(COMMANDS) == {"doctor", "join", "login", "logout", "runs", "whoami"}
    group = typer.main.get_command(app)
    for name in COMMANDS:
        command = group.commands[name]  # type: ignore[attr-defined]
        summary = collapsed(command.help.split("\n\n")[0])
        assert f"{name} {summary}" in page, name


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_help_describes_it_and_every_option(name: str) -> None:
    """Every command says what it does, and every argument and option has help that reaches the page whole."""
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    page = rendered(result)
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    assert command.help and len(command.help.split("\n\n")[0]) > 20, f"{name} has no real description"
    assert collapsed(command.help.split("\n\n")[0]) in page
    # Rich keeps a line break inside a paragraph, so a wrapped docstring line would break mid-sentence on screen.
    assert all("\n" not in paragraph.strip() for paragraph in command.help.split("\n\n")), name
    for parameter in command.params:
        if parameter.name == "help":
            continue
        assert getattr(parameter, "help", None), f"{name}: {parameter.name} has no help"
        assert collapsed(parameter.help) in page, f"{name}: the help of {parameter.name} is cut on the page"


def test_global_option_help_reaches_the_page() -> None:
    page = rendered(CliRunner().invoke(app, ["--help"]))
    home_option = next(p for p in typer.main.get_command(app).params if p.name == "home")
    assert collapsed(home_option.help) in page
