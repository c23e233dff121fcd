"""Config precedence (flag > environment > file > default) and the 0600 credentials file."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from hivewire.config import (
    DEFAULT_TIMEOUT_S,
    ENV_HOME,
    ENV_SERVER,
    ENV_TOKEN,
    CredentialStore,
    default_home,
    load_config,
    normalize_server_url,
    validate_token,
)
from hivewire.errors import ConfigError

TOKEN_FLAG = "hw_" + "f" * 43
TOKEN_ENV = "hw_" + "e" * 43
TOKEN_STORED = "hw_" + "s" * 43


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def write_toml(home: Path, text: str) -> None:
    (home / "config.toml").write_text(text)


def test_defaults(home: Path) -> None:
    config = load_config(home=home, env={})
    assert (config.home, config.server, config.token, config.timeout_s) == (home, None, None, DEFAULT_TIMEOUT_S)
    assert config.credentials_path == home / "credentials.json"
    assert config.key_path == home / "peer_key.pem"


def test_server_precedence_flag_over_env_over_file_over_last_login(home: Path) -> None:
    CredentialStore(home / "credentials.json").store("http://last-login.test", TOKEN_STORED)
    assert load_config(home=home, env={}).server == "http://last-login.test"
    write_toml(home, 'server = "http://file.test"\n')
    assert load_config(home=home, env={}).server == "http://file.test"
    env = {ENV_SERVER: "http://env.test"}
    assert load_config(home=home, env=env).server == "http://env.test"
    assert load_config(server="http://flag.test", home=home, env=env).server == "http://flag.test"


def test_token_precedence_flag_over_env_over_stored(home: Path) -> None:
    CredentialStore(home / "credentials.json").store("http://hive.test", TOKEN_STORED)
    assert load_config(home=home, env={}).token == TOKEN_STORED
    env = {ENV_TOKEN: TOKEN_ENV}
    assert load_config(home=home, env=env).token == TOKEN_ENV
    assert load_config(token=TOKEN_FLAG, home=home, env=env).token == TOKEN_FLAG


def test_stored_token_belongs_to_its_server_only(home: Path) -> None:
    CredentialStore(home / "credentials.json").store("http://hive.test", TOKEN_STORED)
    assert load_config(server="http://other.test", home=home, env={}).token is None
    assert load_config(server="HTTP://HIVE.test/", home=home, env={}).token == TOKEN_STORED


def test_timeout_precedence_flag_over_file_over_default(home: Path) -> None:
    (home / "config.json").write_text(json.dumps({"timeout_s": 3}))
    assert load_config(home=home, env={}).timeout_s == 3.0
    assert load_config(home=home, env={}, timeout_s=7).timeout_s == 7.0


def test_toml_wins_over_json(home: Path) -> None:
    write_toml(home, 'server = "http://toml.test"\n')
    (home / "config.json").write_text(json.dumps({"server": "http://json.test"}))
    assert load_config(home=home, env={}).server == "http://toml.test"


def test_home_comes_from_env_then_xdg(tmp_path: Path) -> None:
    assert default_home({ENV_HOME: str(tmp_path)}) == tmp_path
    assert default_home({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "hivewire"
    write_toml(tmp_path, 'server = "http://from-env-home.test"\n')
    assert load_config(env={ENV_HOME: str(tmp_path)}).server == "http://from-env-home.test"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('sever = "http://typo.test"\n', "unknown setting 'sever'"),
        ("server = [1]\n", "must be a string"),
        ("timeout_s = 0\n", "between 0.1 and 600"),
        ("timeout_s = true\n", "number of seconds"),
        ("server = \n", "not valid TOML"),
        ('server = "ftp://hive.test"\n', "http:// or https://"),
        ("#" * (65 * 1024), "larger than"),
    ],
)
def test_bad_config_file_is_refused_with_its_reason(home: Path, text: str, message: str) -> None:
    write_toml(home, text)
    with pytest.raises(ConfigError, match=message):
        load_config(home=home, env={})


def test_bad_token_from_env_is_refused(home: Path) -> None:
    with pytest.raises(ConfigError, match="API token"):
        load_config(home=home, env={ENV_TOKEN: "secret"})


@pytest.mark.parametrize(
    ("url", "normalized"),
    [
        ("https://Hive.Example.org/", "https://hive.example.org"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("https://example.org/hivewire/", "https://example.org/hivewire"),
    ],
)
def test_server_urls_are_normalized(url: str, normalized: str) -> None:
    assert normalize_server_url(url) == normalized


@pytest.mark.parametrize("url", ["hive.test", "file:///etc/passwd", "http://u:p@hive.test", "http://hive.test/?a=1"])
def test_odd_server_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        normalize_server_url(url)


def test_token_format() -> None:
    assert validate_token(f" {TOKEN_FLAG}\n") == TOKEN_FLAG
    for bad in ("", "hw_short", "Bearer " + TOKEN_FLAG, "hw_" + "!" * 43):
        with pytest.raises(ConfigError):
            validate_token(bad)


def test_credentials_file_is_created_with_mode_0600(home: Path) -> None:
    store = CredentialStore(home / "sub" / "credentials.json")
    store.store("http://hive.test", TOKEN_STORED)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    store.store("http://other.test", TOKEN_FLAG)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert [p.name for p in store.path.parent.iterdir()] == ["credentials.json"]


def test_credentials_store_and_forget(home: Path) -> None:
    store = CredentialStore(home / "credentials.json")
    store.store("http://a.test", TOKEN_STORED)
    store.store("http://b.test/", TOKEN_FLAG)
    assert (store.token("http://a.test"), store.default_server()) == (TOKEN_STORED, "http://b.test")
    assert store.forget("http://b.test")
    assert not store.forget("http://b.test")
    assert (store.token("http://b.test"), store.default_server()) == (None, "http://a.test")


def test_world_readable_credentials_are_repaired(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CredentialStore(home / "credentials.json")
    store.store("http://hive.test", TOKEN_STORED)
    store.path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="hivewire.config"):
        assert store.token("http://hive.test") == TOKEN_STORED
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert "readable by other users" in caplog.text


@pytest.mark.parametrize("content", ["{", "[]", '{"tokens": {"http://hive.test": 5}}'])
def test_damaged_credentials_are_refused(home: Path, content: str) -> None:
    path = home / "credentials.json"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=r"credentials\.json"):
        CredentialStore(path).token("http://hive.test")
