"""Client configuration: one `ClientConfig`, resolved once per command as flag > environment > file > default.

Files live in the Hivewire home (`--home`, else `$HIVEWIRE_HOME`, else `$XDG_CONFIG_HOME/hivewire`, else
`~/.config/hivewire`):

- `config.toml` (or `config.json`): `server = "https://…"`, `timeout_s = 10.0`; written by the volunteer.
- `credentials.json`: API tokens per server URL and the server of the last login, mode 0600; written by
  `hivewire login`.
- `peer_key.pem`: the Ed25519 peer key (see `hivewire.identity`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hivewire.errors import ConfigError

__all__ = [
    "ClientConfig",
    "CredentialStore",
    "default_home",
    "load_config",
    "normalize_server_url",
    "private_dir",
    "validate_token",
    "write_private_file",
]

logger = logging.getLogger(__name__)

ENV_SERVER = "HIVEWIRE_SERVER"
ENV_TOKEN = "HIVEWIRE_TOKEN"
ENV_HOME = "HIVEWIRE_HOME"
DEFAULT_TIMEOUT_S = 10.0
# Local files are small; anything bigger is not ours and is refused before parsing.
MAX_FILE_BYTES = 64 * 1024
_TOKEN = re.compile(r"hw_[A-Za-z0-9_-]{43}")
_CONFIG_KEYS = frozenset({"server", "timeout_s"})


@dataclass(frozen=True)
class ClientConfig:
    """Everything a command needs to talk to one server, already resolved by precedence."""

    # Directory holding config.toml, credentials.json and peer_key.pem (created with mode 0700).
    home: Path
    # Coordinator base URL, normalized (scheme://host[:port][/prefix], no trailing slash); None if unknown.
    server: str | None
    # API token for `server` (`hw_` + 43 base64url characters); None when not signed in.
    token: str | None
    # Timeout of each HTTP request to the server, in seconds.
    timeout_s: float

    @property
    def credentials_path(self) -> Path:
        return self.home / "credentials.json"

    @property
    def key_path(self) -> Path:
        return self.home / "peer_key.pem"


def default_home(env: Mapping[str, str]) -> Path:
    """`$HIVEWIRE_HOME`, else the XDG config directory, so tests and several volunteers can use other homes."""
    if env.get(ENV_HOME):
        return Path(env[ENV_HOME]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "hivewire"


def normalize_server_url(url: str) -> str:
    """One spelling per server (lower-case scheme and host, no trailing slash), so tokens are found again."""
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"server URL {url!r} is not a URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"server URL {url!r} must start with http:// or https:// and name a host")
    if parsed.query or parsed.fragment or parsed.userinfo:
        raise ConfigError(f"server URL {url!r} must not carry a query, fragment or user name")
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path.rstrip('/')}"


def validate_token(token: str) -> str:
    """An API token as docs/protocol.md defines it; checked before it is stored or sent."""
    token = token.strip()
    if not _TOKEN.fullmatch(token):
        raise ConfigError("the API token must look like hw_ followed by 43 letters, digits, - or _")
    return token


def private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if missing; our files hold secrets, so the directory is not listable."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` atomically with mode 0600: a new file is never readable by others, not even briefly."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_small(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_FILE_BYTES} bytes; it is not a Hivewire file")
    return data


def _read_config_file(home: Path) -> dict[str, Any]:
    """The volunteer's own settings file, TOML preferred; unknown keys are refused so typos show."""
    for name, parse in (("config.toml", tomllib.loads), ("config.json", json.loads)):
        path = home / name
        if not path.is_file():
            continue
        try:
            values = parse(_read_small(path).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid {name.rsplit('.', 1)[1].upper()}: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a table of settings")
        unknown = sorted(set(values) - _CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown setting {unknown[0]!r}; known: {', '.join(sorted(_CONFIG_KEYS))}")
        return values
    return {}


def _timeout(value: object, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"timeout_s from {source} must be a number of seconds")
    try:
        seconds = float(value)
    except ValueError as exc:
        raise ConfigError(f"timeout_s from {source} must be a number of seconds, not {value!r}") from exc
    if not 0.1 <= seconds <= 600:
        raise ConfigError(f"timeout_s from {source} must be between 0.1 and 600 seconds, not {seconds}")
    return seconds


@dataclass
class _Credentials:
    # Server of the last login, the default when no flag, environment or config file names one.
    default_server: str | None
    # API token per normalized server URL.
    tokens: dict[str, str]


class CredentialStore:
    """API tokens per normalized server URL, plus the server of the last login, in one 0600 JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> _Credentials:
        if not self.path.is_file():
            return _Credentials(default_server=None, tokens={})
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            logger.warning("%s was readable by other users (mode %o); reset to 0600", self.path, mode)
            self.path.chmod(0o600)
        try:
            data = json.loads(_read_small(self.path))
        except ValueError as exc:
            raise ConfigError(f"{self.path} is not valid JSON; delete it and log in again") from exc
        tokens = data.get("tokens") if isinstance(data, dict) else None
        default = data.get("default_server") if isinstance(data, dict) else None
        if not isinstance(tokens, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()
        ):
            raise ConfigError(f"{self.path} is damaged; delete it and log in again")
        return _Credentials(default_server=default if isinstance(default, str) else None, tokens=tokens)

    def _save(self, data: _Credentials) -> None:
        document = {"version": 1, "default_server": data.default_server, "tokens": data.tokens}
        write_private_file(self.path, json.dumps(document, indent=2).encode())

    def token(self, server: str) -> str | None:
        return self._load().tokens.get(normalize_server_url(server))

    def default_server(self) -> str | None:
        return self._load().default_server

    def store(self, server: str, token: str) -> None:
        """Remember `token` for `server` and make `server` the default for later commands."""
        data = self._load()
        server = normalize_server_url(server)
        data.tokens[server] = validate_token(token)
        data.default_server = server
        self._save(data)

    def forget(self, server: str) -> bool:
        """Drop the token of `server`; True if there was one."""
        data = self._load()
        server = normalize_server_url(server)
        if data.tokens.pop(server, None) is None:
            return False
        if data.default_server == server:
            data.default_server = next(iter(data.tokens), None)
        self._save(data)
        return True


def load_config(
    *,
    server: str | None = None,
    token: str | None = None,
    home: Path | None = None,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> ClientConfig:
    """Resolve each setting as flag (the keyword arguments) > environment > config file > default.

    The home itself comes from the flag, the environment or the default only, since it locates the file.
    The token falls back to the one stored for the resolved server by `hivewire login`; the server falls back
    to the server of the last login.
    """
    env = os.environ if env is None else env
    home = (home or default_home(env)).expanduser()
    file = _read_config_file(home)
    credentials = CredentialStore(home / "credentials.json")

    if server is None and env.get(ENV_SERVER):
        server = env[ENV_SERVER]
    if server is None and "server" in file:
        if not isinstance(file["server"], str):
            raise ConfigError(f"server in {home}/config file must be a string")
        server = file["server"]
    if server is None:
        server = credentials.default_server()
    server = normalize_server_url(server) if server is not None else None

    if token is None and env.get(ENV_TOKEN):
        token = env[ENV_TOKEN]
    if token is None and server is not None:
        token = credentials.token(server)
    token = validate_token(token) if token is not None else None

    if timeout_s is not None:
        timeout = _timeout(timeout_s, "the command line")
    elif "timeout_s" in file:
        timeout = _timeout(file["timeout_s"], f"{home}/config file")
    else:
        timeout = DEFAULT_TIMEOUT_S
    return ClientConfig(home=home, server=server, token=token, timeout_s=timeout)
