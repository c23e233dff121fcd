"""The local demo: a server, an organizer, a run and three volunteers training tiny-lm together on loopback.

Each volunteer signs in through the device grant (`hivewire login --headless`, approved here as its user),
then runs `hivewire join` with `--ice-address 127.0.0.1`; the server hands out no STUN or TURN, so no packet
leaves this machine. Prints the dashboard URL and a live summary; Ctrl-C or --minutes stops every child.
Once the volunteers left (each flushes its reports and co-signed round receipts), prints the run's
leaderboard from the server: verified samples come from the receipts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
SLUG = "tiny-lm-demo"
NAMES = ("ada", "brook", "cyril")
PROGRESS = re.compile(r"^epoch (?P<epoch>\d+) \| loss (?P<loss>[0-9.]+)")
PEERS = re.compile(r"\| peers (?P<peers>\d+)")
CODE = re.compile(r"enter the code (?P<code>\S+)")
START_TIMEOUT_S = 60.0
LEAVE_TIMEOUT_S = 40.0  # SIGINT to exit: receipts co-signed, links flushed, mesh closed, reports sent (each bounded)


class Stop(Exception):
    """Ctrl-C or SIGTERM reached the demo."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stop


@dataclass
class Child:
    """A child process in its own process group (so Ctrl-C reaches it only through us); its output lines."""

    name: str
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, args: list[str], env: dict[str, str], log: Path) -> Child:
        process = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        child = cls(name, process)
        threading.Thread(target=child._read, args=(process.stdout, log), daemon=True).start()
        return child

    def _read(self, stream: IO[str], log: Path) -> None:
        with stream, log.open("a") as sink:
            for line in stream:
                self.lines.append(line)
                sink.write(line)
                sink.flush()

    def progress(self) -> tuple[list[float], int, int]:
        """(losses of every completed epoch line, last epoch, last peer count) from the output so far."""
        losses, epoch, peers = [], 0, 0
        for line in list(self.lines):
            match = PROGRESS.search(line)
            if match:
                losses.append(float(match["loss"]))
                epoch = int(match["epoch"])
                found = PEERS.search(line)
                peers = int(found["peers"]) if found else peers
        return losses, epoch, peers

    def send(self, sig: int) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def stop(self, timeout_s: float = LEAVE_TIMEOUT_S) -> None:
        """Wait for the signalled child, then kill its group (no orphan: the network process shares it)."""
        if self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_server(port: int, home: Path, env: dict[str, str]) -> Child:
    url = f"http://{LOOPBACK}:{port}"
    args = [str(BIN / "hivewire-server"), "serve", "--host", LOOPBACK, "--port", str(port)]
    server = Child.start("server", args, env, home / "server.log")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop(0)
    raise SystemExit(f"demo: the server did not start; see {home / 'server.log'}:\n{''.join(server.lines[-20:])}")


def sign_up(http: httpx.Client, name: str, password: str) -> str:
    """A new account, signed in on `http`'s cookie jar; its email."""
    email = f"{name}@example.org"
    response = http.post("/api/auth/signup", json={"email": email, "password": password, "display_name": name})
    response.raise_for_status()
    return email


def device_login(url: str, login: Child, password: str) -> str:
    """Approve the code a running `hivewire login --headless` printed, as a new user named after it; the code."""
    deadline = time.monotonic() + START_TIMEOUT_S
    code = None
    while code is None and time.monotonic() < deadline and login.process.poll() is None:
        code = next((m["code"] for m in map(CODE.search, list(login.lines)) if m), None)
        time.sleep(0.05)
    if code is None:
        raise SystemExit(f"demo: {login.name}'s login printed no code:\n{''.join(login.lines)}")
    with httpx.Client(base_url=url, timeout=10.0) as user:
        sign_up(user, login.name, password)
        user.post("/api/device/approve", json={"user_code": code, "approve": True}).raise_for_status()
    return code


def summary(elapsed: float, volunteers: list[Child]) -> str:
    parts, firsts, lasts = [], [], []
    for volunteer in volunteers:
        losses, epoch, peers = volunteer.progress()
        state = "left" if volunteer.process.poll() is not None else f"epoch {epoch}"
        parts.append(f"{volunteer.name} {state}" + (f" loss {losses[-1]:.3f} peers {peers}" if losses else ""))
        if losses:
            firsts.append(losses[0])
            lasts.append(losses[-1])
    trend = f"loss {min(firsts):.3f} -> {min(lasts):.3f} | " if lasts else "waiting for the first epoch | "
    return f"[{elapsed:5.0f}s] {trend}" + "; ".join(parts)


def leaderboard(url: str) -> str:
    """The run's leaderboard as the server counts it, one line per volunteer; a line saying why if unavailable."""
    try:
        response = httpx.get(f"{url}/api/runs/{SLUG}/leaderboard", timeout=10.0)
        response.raise_for_status()
        rows = response.json()["data"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return f"  leaderboard unavailable: {exc}"
    if not rows:
        return "  leaderboard: empty (no report or receipt reached the server)"
    lines = [f"  {'rank':>4}  {'volunteer':<12} {'verified':>9} {'reported':>9} {'rounds':>6} {'online s':>8}"]
    for row in rows:
        lines.append(
            f"  {row['rank']:>4}  {str(row['display_name'])[:12]:<12} {row['verified_samples']:>9} "
            f"{row['reported_samples']:>9} {row['rounds']:>6} {row['online_seconds']:>8.0f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0, help="stop after this long (default 5)")
    parser.add_argument("--port", type=int, default=8000, help="the server's port on 127.0.0.1 (default 8000)")
    parser.add_argument("--target-batch", type=int, default=1024, help="samples per epoch for the whole run")
    parser.add_argument("--max-epochs", type=int, default=100_000, help="volunteers leave at this epoch")
    parser.add_argument("--home", type=Path, default=ROOT / "var" / "demo", help="emptied, then holds it all")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between summary lines")
    args = parser.parse_args()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    home: Path = args.home.resolve()
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    url = f"http://{LOOPBACK}:{args.port}"
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    server_env = {
        **base_env,
        "DATABASE_URL": f"sqlite:///{home / 'hivewire.db'}",
        "PUBLIC_URL": url,
        "STUN_URLS": "",  # loopback only: no STUN or TURN server is handed out
        "TURN_URLS": "",
    }
    children: list[Child] = []
    volunteers: list[Child] = []
    board = ""
    started = time.monotonic()
    try:
        print(f"Hivewire demo: starting the server on {url} (database {home / 'hivewire.db'})", flush=True)
        children.append(start_server(args.port, home, server_env))
        password = secrets.token_urlsafe(9)
        with httpx.Client(base_url=url, timeout=10.0) as organizer:
            email = sign_up(organizer, "organizer", password)
            run = {
                "slug": SLUG,
                "name": "Tiny LM demo",
                "description": "Three local volunteers train a small language model",
                "recipe": "tiny-lm",
                "strategy": "dedloc",
                "target_batch_size": args.target_batch,
                "group_size": 8,
                "compression": "none",
            }
            organizer.post("/api/runs", json=run).raise_for_status()
        print(f"  organizer: {email} / password {password}", flush=True)
        envs = {name: {**base_env, "HIVEWIRE_HOME": str(home / name), "OMP_NUM_THREADS": "1"} for name in NAMES}
        logins: list[Child] = []
        for name, env in envs.items():  # the volunteers sign in as a volunteer would: the device grant
            env.pop("HIVEWIRE_TOKEN", None)
            command = [str(BIN / "hivewire"), "login", url, "--headless"]
            logins.append(Child.start(name, command, env, home / f"{name}.log"))
            children.append(logins[-1])
        for login in logins:
            code = device_login(url, login, password)
            print(f"  {login.name}: `hivewire login {url} --headless` printed {code}; approved as its user", flush=True)
        for login in logins:
            if login.process.wait(timeout=START_TIMEOUT_S) != 0:
                raise SystemExit(f"demo: {login.name}'s login failed:\n{''.join(login.lines)}")
        for name, env in envs.items():
            join = [
                str(BIN / "hivewire"),
                *("join", f"{url}/runs/{SLUG}", "--ice-address", LOOPBACK, "--batch-size", "8"),
                *("--max-epochs", str(args.max_epochs), "--checkpoint-dir", str(home / name / "checkpoint")),
            ]
            volunteers.append(Child.start(name, join, env, home / f"{name}.log"))
            children.append(volunteers[-1])
        print(f"  {', '.join(NAMES)}: `hivewire join {url}/runs/{SLUG} --ice-address {LOOPBACK}`", flush=True)
        print(f"Dashboard: {url}/runs/{SLUG}  (logs in {home}; Ctrl-C stops)", flush=True)
        deadline = started + args.minutes * 60
        while time.monotonic() < deadline and any(v.process.poll() is None for v in volunteers):
            time.sleep(min(args.every, max(deadline - time.monotonic(), 0)))
            print(summary(time.monotonic() - started, volunteers), flush=True)
    except Stop:
        print("\nStopping…", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave children behind
        for volunteer in volunteers:
            volunteer.send(signal.SIGINT)  # all at once: they leave the mesh together
        for volunteer in volunteers:
            volunteer.stop()  # each flushes its reports and receipts to the server before it exits
        if children and children[0].process.poll() is None:  # the server, still up
            board = leaderboard(url)
        for child in reversed(children):
            if child not in volunteers:
                child.send(signal.SIGTERM)
            child.stop()
    for volunteer in volunteers:
        left = next((line.strip() for line in volunteer.lines if line.startswith("Left run")), "did not say goodbye")
        print(f"  {volunteer.name}: {left}", flush=True)
    print(summary(time.monotonic() - started, volunteers), flush=True)
    if board:
        print(f"Leaderboard of {SLUG} (samples; verified = co-signed by the averaging groups):", flush=True)
        print(board, flush=True)
    print("Demo stopped; every child process has exited.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
