"""The real server in its own process on loopback (SQLite), for tests that need it to stop and come back:
the mesh and training end-to-end tests share it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import LOOPBACK, free_port

SERVER_START_TIMEOUT_S = 60.0  # a server that does not answer /healthz by then failed to start (CI runs loaded)
SERVER_STOP_TIMEOUT_S = 10.0  # then it is killed
SESSION_SECRET = "live-server-session-secret-0123456789abcdef"


class Server:
    """The real server in its own process; stop() and start() again keep the port and the database."""

    def __init__(self, database: Path, log: Path, *, start_timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._log = log
        self._env = {
            **os.environ,
            "DATABASE_URL": f"sqlite:///{database}",
            "PUBLIC_URL": self.url,
            "SESSION_SECRET": SESSION_SECRET,
            "STUN_URLS": "",
            "TURN_URLS": "",
        }
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "hivewire_server.cli", "serve", "--no-migrate", "--port", str(self.port)]
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(command, env=self._env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        status = self._process.poll()
        self.stop()  # a server that failed to answer in time must not outlive the test
        pytest.fail(f"server {self.url} did not start (exit {status}):\n{self._log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Terminate (the server closes signaling sockets with 1001), kill if it lingers."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
