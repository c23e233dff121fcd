"""Volunteers training through the real server: `hivewire join` processes against a uvicorn process on loopback.

No packet may leave loopback: the server hands out no STUN or TURN (ICE servers ``[]``) and every volunteer
runs with ``--ice-address 127.0.0.1``, so aioice gathers host candidates on loopback alone. Each volunteer
has its own user, API token (``HIVEWIRE_TOKEN``) and home (its own peer key).
"""

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.client.live_server import Server
from tests.conftest import RUN, Account, new_user
from tests.support import LOOPBACK

SLUG = "tiny-lm-e2e"
# 2 peers x 8 sequences per micro-batch: an epoch is ~32 micro-batches each, long enough (~2 s alone) for
# the second volunteer to link and catch up before the first runs ahead; no compression, so the
# butterfly's mean is exact and every peer applies the same bits.
E2E_RUN = {**RUN, "slug": SLUG, "name": "Tiny LM e2e", "target_batch_size": 512, "compression": "none"}
HIVEWIRE = str(Path(sys.executable).parent / "hivewire")
JOIN_TIMEOUT_S = 180.0  # a volunteer that has not exited by then is killed and the test fails (2 cores shared)


@pytest.fixture
def organizer(http: httpx.Client) -> Account:
    user = new_user(http, "olivia")  # type: ignore[arg-type]  # httpx.Client has the TestClient calls used
    response = http.post("/api/runs", json=E2E_RUN, headers=user.headers)
    assert response.status_code == 201, response.text
    return user


@dataclass
class Volunteer:
    """One `hivewire join` process; a thread collects its output line by line as it comes."""

    name: str
    home: Path
    process: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def checkpoint(self) -> Path:
        return self.home / "checkpoint" / "model.pt"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def start(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.lines.append(line)

    def wait_for(self, text: str, timeout_s: float = JOIN_TIMEOUT_S, *, times: int = 1) -> None:
        """Until ``times`` lines containing ``text`` were printed; fails after ``timeout_s`` or when the process
        exited."""
        deadline = time.monotonic() + timeout_s
        while sum(text in line for line in self.lines) < times:
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.wait()
                pytest.fail(f"{self.name} never printed {text!r}:\n{self.output[-4000:]}")
            time.sleep(0.05)

    def wait(self, timeout_s: float = JOIN_TIMEOUT_S) -> int:
        assert self.process is not None and self._reader is not None
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self._reader.join()
            self._keep_output()
            pytest.fail(f"{self.name} did not exit within {timeout_s} s:\n{self.output[-4000:]}")
        self._reader.join()
        self._keep_output()
        return self.process.returncode

    def _keep_output(self) -> None:
        """The whole output in the volunteer's home, for a failure's post-mortem (the message shows its end)."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "output.log").write_text(self.output)


class Volunteers:
    """Factory of volunteers on one server; every process still running at teardown is killed."""

    def __init__(self, server: Server, http: httpx.Client, root: Path) -> None:
        self.server, self._http, self._root = server, http, root
        self.started: list[Volunteer] = []

    def join(self, name: str, *args: str, slug: str = SLUG) -> Volunteer:
        user = new_user(self._http, name)  # type: ignore[arg-type]
        volunteer = Volunteer(name, self._root / name)
        env = {
            **os.environ,
            "HIVEWIRE_HOME": str(volunteer.home),
            "HIVEWIRE_SERVER": self.server.url,
            "HIVEWIRE_TOKEN": user.token,
            "OMP_NUM_THREADS": "1",  # several volunteers share this machine's cores
            "PYTHONUNBUFFERED": "1",  # lines as they are printed, for wait_for()
        }
        args = [
            HIVEWIRE,
            "join",
            f"{self.server.url}/runs/{slug}",
            "--ice-address",
            LOOPBACK,
            "--checkpoint-dir",
            str(volunteer.home / "checkpoint"),
            *args,
        ]
        volunteer.start(args, env)
        self.started.append(volunteer)
        return volunteer


@pytest.fixture
def volunteers(server: Server, http: httpx.Client, organizer: Account, tmp_path: Path) -> Iterator[Volunteers]:
    factory = Volunteers(server, http, tmp_path)
    yield factory
    for volunteer in factory.started:
        if volunteer.process is not None and volunteer.process.poll() is None:
            volunteer.process.kill()
            volunteer.wait()
