"""The server serves the volunteer client's wheel, so a join page's `pip install` works against any server.

A real wheel is built once per module from volunteer_client/ (a copy, so no build/ lands in the tree); pip
itself then fetches it from a running `hivewire-server serve` and checks the hash the join page shows.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from hivewire_server.client_wheels import ClientWheels, install_command
from hivewire_server.main import create_app
from tests.conftest import PASSWORD, RUN, make_settings, new_user
from tests.server.test_cli import wait_for_health
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
SERVER = [sys.executable, "-m", "hivewire_server.cli"]


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hivewire-<version>-py3-none-any.whl, built as the server image builds it (`pip wheel --no-deps`)."""
    work = tmp_path_factory.mktemp("client-build")
    source = work / "volunteer_client"
    shutil.copytree(
        REPO / "volunteer_client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    # No build isolation: the build backend (setuptools) is already in the venv and no index is needed.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--wheel-dir", "out", "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = (source / "out").glob("hivewire-*.whl")
    return wheel


@pytest.fixture
def wheel_dir(tmp_path: Path, built_wheel: Path) -> Path:
    directory = tmp_path / "wheels"
    directory.mkdir()
    shutil.copy(built_wheel, directory)
    return directory


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def app_client(tmp_path: Path, sqlite_template: Path, **settings: object) -> TestClient:
    database = tmp_path / "hivewire.db"
    shutil.copy(sqlite_template, database)
    return TestClient(create_app(make_settings(f"sqlite:///{database}", **settings)))


@pytest.fixture
def client(tmp_path: Path, sqlite_template: Path, wheel_dir: Path) -> Iterator[TestClient]:
    with app_client(tmp_path, sqlite_template, client_wheel_dir=str(wheel_dir)) as test_client:
        yield test_client


def test_the_built_wheel_is_listed_with_its_hash(client: TestClient, built_wheel: Path) -> None:
    response = client.get("/downloads")
    assert response.status_code == 200
    assert response.json() == {
        "data": [
            {
                "filename": built_wheel.name,
                "version": "0.1.0",
                "size": built_wheel.stat().st_size,
                "sha256": sha256(built_wheel),
                "url": f"http://testserver/downloads/{built_wheel.name}",
            }
        ],
        "count": 1,
    }


def test_the_wheel_is_served_byte_for_byte(client: TestClient, built_wheel: Path) -> None:
    response = client.get(f"/downloads/{built_wheel.name}")
    assert response.status_code == 200
    assert response.content == built_wheel.read_bytes()
    assert response.headers["content-type"] == "application/octet-stream"
    assert f'filename="{built_wheel.name}"' in response.headers["content-disposition"]
    digest = base64.b64encode(hashlib.sha256(response.content).digest()).decode()
    assert response.headers["repr-digest"] == f"sha-256=:{digest}:"


def test_newest_version_comes_first_by_version_not_by_name(client: TestClient, wheel_dir: Path) -> None:
    for version in ("0.2.0", "0.10.0", "0.11.0rc1", "0.9.0"):
        (wheel_dir / f"hivewire-{version}-py3-none-any.whl").write_bytes(version.encode())
    versions = [row["version"] for row in client.get("/downloads").json()["data"]]
    assert versions == ["0.11.0rc1", "0.10.0", "0.9.0", "0.2.0", "0.1.0"]
    newest = client.app.state.client_wheels.newest()  # type: ignore[attr-defined]
    assert newest.filename == "hivewire-0.11.0rc1-py3-none-any.whl"
    assert newest.sha256 == hashlib.sha256(b"0.11.0rc1").hexdigest()


def test_a_replaced_wheel_is_hashed_again(client: TestClient, wheel_dir: Path) -> None:
    """The hash cache follows the file: a wheel rebuilt under the same name gets its new hash listed."""
    path = wheel_dir / "hivewire-0.3.0-py3-none-any.whl"
    path.write_bytes(b"first build")
    assert client.get("/downloads").json()["data"][0]["sha256"] == hashlib.sha256(b"first build").hexdigest()
    path.write_bytes(b"second build, longer")
    assert client.get("/downloads").json()["data"][0]["sha256"] == hashlib.sha256(b"second build, longer").hexdigest()


@pytest.mark.parametrize(
    "name",
    [
        "..%2F..%2Fsecret.txt",
        "..%2Fwheels%2Fhivewire-0.1.0-py3-none-any.whl",
        "%2Fetc%2Fpasswd",
        "hivewire-0.1.0-py3-none-any.whl.part",
        "other-0.1.0-py3-none-any.whl",
        "hivewire-0.1.0-py3-none-any.WHL",
        "hivewire-0.4.0-py3-none-any.whl",  # a wheel name, but not in the folder
    ],
)
def test_only_listed_wheel_names_are_served(client: TestClient, wheel_dir: Path, name: str) -> None:
    (wheel_dir.parent / "secret.txt").write_text("not for download")
    (wheel_dir / "hivewire-0.1.0-py3-none-any.whl.part").write_text("half a wheel")
    (wheel_dir / "other-0.1.0-py3-none-any.whl").write_text("another project")
    response = client.get(f"/downloads/{name}")
    assert response.status_code == 404
    assert "not for download" not in response.text


def test_links_and_folders_are_not_served(
    client: TestClient, wheel_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A symbolic link named like a wheel could point anywhere: it is neither listed nor served, and logged once."""
    secret = wheel_dir.parent / "secret.txt"
    secret.write_text("not for download")
    (wheel_dir / "hivewire-9.9.9-py3-none-any.whl").symlink_to(secret)
    (wheel_dir / "hivewire-9.9.8-py3-none-any.whl").mkdir()
    with caplog.at_level(logging.WARNING, logger="hivewire.downloads"):
        listed = [row["version"] for row in client.get("/downloads").json()["data"]]
        client.get("/downloads")
    assert listed == ["0.1.0"]
    assert client.get("/downloads/hivewire-9.9.9-py3-none-any.whl").status_code == 404
    warnings = [record.getMessage() for record in caplog.records]
    assert sum("hivewire-9.9.9" in message and "not a regular file" in message for message in warnings) == 1


def sign_in(client: TestClient) -> str:
    """An organizer with a run, signed in by cookie; returns the run's join page path."""
    organizer = new_user(client, "olivia")
    assert client.post("/api/runs", json=RUN, headers=organizer.headers).status_code == 201
    assert client.post("/api/auth/login", json={"email": organizer.email, "password": PASSWORD}).status_code == 200
    return f"/runs/{RUN['slug']}/join"


def test_join_page_installs_the_served_wheel_pinned_by_hash(client: TestClient, built_wheel: Path) -> None:
    page = client.get(sign_in(client))
    assert page.status_code == 200
    command = f'pip install "http://testserver/downloads/{built_wheel.name}#sha256={sha256(built_wheel)}"'
    assert f'<code id="cmd-1">{command.replace(chr(34), "&#34;")}</code>' in page.text
    assert sha256(built_wheel) in page.text


def test_without_wheels_the_join_page_names_the_package_index(
    tmp_path: Path, sqlite_template: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "no-wheels-yet"
    empty.mkdir()
    with (
        caplog.at_level(logging.WARNING, logger="hivewire.server"),
        app_client(tmp_path, sqlite_template, client_wheel_dir=str(empty)) as client,
    ):
        assert '<code id="cmd-1">pip install hivewire</code>' in client.get(sign_in(client)).text
        assert client.get("/downloads").json() == {"data": [], "count": 0}
    assert any("holds no hivewire-*.whl" in record.getMessage() for record in caplog.records)


def test_unset_directory_serves_nothing() -> None:
    wheels = ClientWheels(None)
    assert (wheels.available(), wheels.newest(), wheels.get("hivewire-0.1.0-py3-none-any.whl")) == ([], None, None)
    assert install_command("https://hive.example.org", None) == "pip install hivewire"


@pytest.mark.slow
def test_pip_fetches_the_wheel_from_a_running_server_and_checks_its_hash(
    tmp_path: Path, wheel_dir: Path, built_wheel: Path
) -> None:
    """The whole path an organizer deploys: `hivewire-server serve` with CLIENT_WHEEL_DIR, then pip itself."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "PUBLIC_URL": url,
        "CLIENT_WHEEL_DIR": str(wheel_dir),
        "LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen([*SERVER, "serve", "--port", str(port)], env=env)
    try:
        wait_for_health(url, process)
        (listed,) = httpx.get(f"{url}/downloads").json()["data"]
        command = install_command(url, ClientWheels(wheel_dir).newest())
        link = re.fullmatch(r'pip install "(.+)"', command)
        assert link is not None
        assert link[1] == f"{listed['url']}#sha256={listed['sha256']}"

        def pip_download(target: str, dest: Path) -> subprocess.CompletedProcess[str]:
            # --no-index: the link is all pip may use; nothing goes to a package index.
            return subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-index", "--dest", str(dest), target],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_CACHE_DIR": str(tmp_path / "cache")},
            )

        fetched = pip_download(link[1], tmp_path / "good")
        assert fetched.returncode == 0, fetched.stderr
        assert sha256(tmp_path / "good" / built_wheel.name) == sha256(built_wheel)

        tampered = pip_download(f"{listed['url']}#sha256={'0' * 64}", tmp_path / "bad")
        assert tampered.returncode != 0
        assert "DO NOT MATCH THE HASHES" in tampered.stderr
        assert sha256(built_wheel) in tampered.stderr  # pip names the hash it got
        assert not (tmp_path / "bad" / built_wheel.name).exists()
    finally:
        process.terminate()
        process.wait(timeout=10)
