"""Training overhead benchmark: a volunteer's samples/s while collaborating vs the same recipe training alone.

Prints one table; every row is measured in the same run, on the same machine, under the same contention:
each phase runs two training processes at once (one torch thread each), so the rows differ only in what
the processes do besides training:

* ``local loop``: two plain loops of the recipe (dedloc's micro-batches and optimizer step at the target
  batch, averaging with no one), no server, no network process: the ceiling;
* ``join, alone``: two ``hivewire join`` volunteers, each alone in its own run of a real server (network
  process, gossip, a round of one member at every epoch): the framework without collaboration;
* ``join, together``: two ``hivewire join`` volunteers in one run: matchmaking and a butterfly round over
  WebRTC on loopback at every epoch. This is the row the benchmark is about;
* ``diloco blocking`` and ``diloco overlap``: two volunteers together in a diloco run (``--diloco-inner-steps``
  H, 0 skips them), the trainer waiting for every round, or averaging beside computation (the outer step
  one round late); their ratio is what overlap buys.

A volunteer's samples/s is its own trainer's rate (samples it computed / seconds since its training began,
time blocked in averaging included), from its last progress line after ``--seconds`` of training. Ratios
are against the local loop and the lone volunteers. The server runs on 127.0.0.1 with an SQLite database
in a temporary directory, hands out no STUN or TURN, and every volunteer gathers host candidates on
127.0.0.1 only: nothing leaves loopback. It never asserts on times; the load average is printed with the
table, since other work on the machine skews every row.

Usage::

    python bench/overhead.py                    # under 4 minutes: 20 s of training per phase
    python bench/overhead.py --seconds 60 --target-batch 1024 --compression fp16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

LOOPBACK = "127.0.0.1"
BIN = Path(sys.executable).parent
PASSWORD = "overhead-bench-password"
RATE = re.compile(r"^epoch (?P<epoch>\d+) \| loss [0-9.]+ \| local (?P<rate>\d+) samples/s")
PEERS = re.compile(r"\| peers (?P<peers>\d+)")
START_TIMEOUT_S = 60.0  # for the server to answer, for a volunteer's first epoch line
LEAVE_TIMEOUT_S = 30.0  # from SIGINT to exit; then the process group is killed


@dataclass
class Child:
    """A child process in its own process group; its output lines, read by a thread as they come."""

    name: str
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, args: list[str], env: dict[str, str]) -> Child:
        process = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        child = cls(name, process)
        threading.Thread(target=child._read, args=(process.stdout,), daemon=True).start()
        return child

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.lines.append(line)

    def rates(self) -> list[tuple[int, float]]:
        """(epoch, cumulative samples/s) of every progress line so far."""
        return [(int(m["epoch"]), float(m["rate"])) for m in map(RATE.search, list(self.lines)) if m]

    def peers(self) -> int:
        """The most peers the volunteer's view held (0 for a local loop): proof that it had company."""
        return max((int(m["peers"]) for m in map(PEERS.search, list(self.lines)) if m), default=0)

    def stop(self, sig: int = signal.SIGINT) -> None:
        """Signal the child, wait for it to leave, then kill its group so nothing is left behind."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=LEAVE_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def local_worker(seconds: float, target_batch: int, batch_size: int, run: str) -> None:
    """One plain training loop of tiny-lm under dedloc with no one to average with; prints its rate."""
    import torch

    from hivewire.recipes import TinyLM, shard_seed
    from hivewire.session.trainer import build_strategy

    torch.set_num_threads(1)
    recipe = TinyLM()
    strategy = build_strategy("dedloc", recipe, run, lambda tensors, weight: [t.clone() for t in tensors])
    batches = recipe.batches(shard_seed(f"local-{os.getpid()}"), batch_size, torch.device("cpu"))
    samples, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        batch = next(batches)
        strategy.backward(recipe.loss(strategy.model, batch), recipe.samples_in(batch))
        samples += recipe.samples_in(batch)
        if strategy.samples_accumulated >= target_batch:
            strategy.step()
    rate = samples / (time.monotonic() - started)
    print(f"epoch {strategy.epoch} | loss 0.000 | local {rate:.0f} samples/s", flush=True)


class Bench:
    """The server, its accounts and runs, and the phases that start volunteers on it."""

    def __init__(self, home: Path, args: argparse.Namespace) -> None:
        self.home, self.args = home, args
        self.url = f"http://{LOOPBACK}:{free_port()}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
        self.server: Child | None = None
        self.organizer_token = ""

    def start_server(self) -> None:
        port = self.url.rsplit(":", 1)[1]
        env = {
            **self.env,
            "DATABASE_URL": f"sqlite:///{self.home / 'hivewire.db'}",
            "PUBLIC_URL": self.url,
            "STUN_URLS": "",  # loopback only: no STUN or TURN server is handed out
            "TURN_URLS": "",
        }
        args = [str(BIN / "hivewire-server"), "serve", "--host", LOOPBACK, "--port", port]
        self.server = Child.start("server", args, env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.server.process.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    self.organizer_token = self.new_token("organizer")  # the first account organizes
                    return
            time.sleep(0.2)
        raise SystemExit(f"overhead: the server did not start:\n{''.join(self.server.lines[-20:])}")

    def new_token(self, name: str) -> str:
        """A new account and an API token for it (as `hivewire login --token` would use)."""
        with httpx.Client(base_url=self.url, timeout=10.0) as http:
            account = {"email": f"{name}@example.org", "password": PASSWORD, "display_name": name}
            http.post("/api/auth/signup", json=account).raise_for_status()
            response = http.post("/api/tokens", json={"name": "bench"})
            response.raise_for_status()
            return str(response.json()["token"])

    def create_run(self, slug: str, *, inner_steps: int = 0, overlap: bool = False) -> None:
        """A tiny-lm run: dedloc, or diloco with ``inner_steps`` and ``overlap`` when ``inner_steps`` > 0."""
        run = {
            "slug": slug,
            "name": slug,
            "description": "bench/overhead.py",
            "recipe": "tiny-lm",
            "strategy": "diloco" if inner_steps else "dedloc",
            "target_batch_size": self.args.target_batch,
            "group_size": 8,
            "compression": self.args.compression,
        }
        if inner_steps:
            run |= {"inner_steps": inner_steps, "overlap": overlap}
        headers = {"Authorization": f"Bearer {self.organizer_token}"}
        httpx.post(f"{self.url}/api/runs", json=run, headers=headers, timeout=10.0).raise_for_status()

    def volunteer(self, name: str, slug: str) -> Child:
        home = self.home / name
        env = {**self.env, "HIVEWIRE_HOME": str(home), "HIVEWIRE_SERVER": self.url}
        env["HIVEWIRE_TOKEN"] = self.new_token(name)
        join = [str(BIN / "hivewire"), "join", f"{self.url}/runs/{slug}", "--ice-address", LOOPBACK]
        join += ["--batch-size", str(self.args.batch_size)]
        return Child.start(name, join, env)

    def local_loops(self) -> list[Child]:
        command = [sys.executable, __file__, "--local-worker", "--seconds", str(self.args.seconds)]
        command += ["--target-batch", str(self.args.target_batch), "--batch-size", str(self.args.batch_size)]
        return [Child.start(f"local-{index}", command, self.env) for index in range(2)]

    def measure(self, children: list[Child], *, volunteers: bool) -> tuple[list[float], int]:
        """Each child's samples/s (volunteers after --seconds past their first epoch, local loops at their exit),
        and the most peers any of them saw."""
        try:
            if volunteers:
                deadline = time.monotonic() + START_TIMEOUT_S
                while not all(child.rates() for child in children):
                    dead = [child.name for child in children if child.process.poll() is not None]
                    if dead or time.monotonic() > deadline:
                        tails = "".join(line for child in children for line in child.lines[-15:])
                        raise SystemExit(f"overhead: {dead or 'a volunteer'} printed no epoch line:\n{tails}")
                    time.sleep(0.2)
                time.sleep(self.args.seconds)
            else:
                for child in children:
                    child.process.wait(timeout=self.args.seconds + START_TIMEOUT_S)
        finally:
            for child in children:
                child.stop()
        rates = [child.rates()[-1][1] if child.rates() else float("nan") for child in children]
        return rates, max(child.peers() for child in children)


def row(name: str, measured: tuple[list[float], int], local: float, alone: float) -> str:
    rates, peers = measured
    mean = sum(rates) / len(rates)
    each = " / ".join(f"{rate:.0f}" for rate in rates)
    ratio_local = f"{mean / local:.2f}" if local else "n/a"
    ratio_alone = f"{mean / alone:.2f}" if alone else "n/a"
    return f"{name:<18} {each:>14} {mean:>8.0f} {ratio_local:>8} {ratio_alone:>8} {peers or '-':>6}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="training time measured per phase (default 20)")
    parser.add_argument("--target-batch", type=int, default=512, help="the run's samples per epoch (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="each volunteer's micro-batch (default 8)")
    parser.add_argument("--compression", default="none", choices=("none", "fp16", "int8"))
    parser.add_argument(
        "--diloco-inner-steps", type=int, default=32, help="H of the diloco rows, blocking vs overlap (0: skip them)"
    )
    parser.add_argument("--local-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_worker:
        local_worker(args.seconds, args.target_batch, args.batch_size, "overhead-local")
        return 0

    with tempfile.TemporaryDirectory(prefix="hivewire-overhead-") as directory:
        bench = Bench(Path(directory), args)
        try:
            print(f"overhead: server on {bench.url}; {args.seconds:.0f} s of training per phase", flush=True)
            bench.start_server()
            phases = 5 if args.diloco_inner_steps else 3
            print(f"phase 1/{phases}: two local loops", flush=True)
            local = bench.measure(bench.local_loops(), volunteers=False)
            print(f"phase 2/{phases}: two volunteers, each alone in its own run", flush=True)
            for slug in ("alone-a", "alone-b", "together"):
                bench.create_run(slug)
            alone = bench.measure(
                [bench.volunteer("ada", "alone-a"), bench.volunteer("brook", "alone-b")], volunteers=True
            )
            print(f"phase 3/{phases}: two volunteers together in one run", flush=True)
            together = bench.measure(
                [bench.volunteer("cyril", "together"), bench.volunteer("dora", "together")], volunteers=True
            )
            diloco: dict[str, tuple[list[float], int]] = {}
            for phase, overlap in enumerate((False, True), start=4):
                if not args.diloco_inner_steps:
                    break
                mode = "overlap" if overlap else "blocking"
                print(f"phase {phase}/{phases}: two volunteers together in a diloco run, {mode}", flush=True)
                bench.create_run(f"diloco-{mode}", inner_steps=args.diloco_inner_steps, overlap=overlap)
                pair = [bench.volunteer(f"{name}-{mode}", f"diloco-{mode}") for name in ("emil", "fay")]
                diloco[mode] = bench.measure(pair, volunteers=True)
        finally:
            if bench.server is not None:
                bench.server.stop(signal.SIGTERM)
    local_mean, alone_mean = sum(local[0]) / 2, sum(alone[0]) / 2
    print()
    print(
        f"tiny-lm, dedloc, target batch {args.target_batch}, micro-batch {args.batch_size}, "
        f"compression {args.compression}, 2 processes per phase, 1 torch thread each"
    )
    print(f"{'phase':<18} {'samples/s each':>14} {'mean':>8} {'/ local':>8} {'/ alone':>8} {'peers':>6}")
    print(row("local loop", local, local_mean, alone_mean))
    print(row("join, alone", alone, local_mean, alone_mean))
    print(row("join, together", together, local_mean, alone_mean))
    for mode, measured in diloco.items():
        print(row(f"diloco {mode}", measured, local_mean, alone_mean))
    if len(diloco) == 2:
        blocking, overlapped = (sum(diloco[mode][0]) / 2 for mode in ("blocking", "overlap"))
        print(f"diloco (H={args.diloco_inner_steps}) overlap / blocking: {overlapped / blocking:.2f}")
    print(f"load average {' '.join(f'{value:.2f}' for value in os.getloadavg())} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
