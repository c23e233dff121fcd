"""Averaging benchmark: one butterfly round over each transport, against gloo and the bandwidth bound, same run.

Prints one table. Each row is the median wall time of one averaging round (the slowest peer's time, every
round started together behind a barrier, after one warm-up round) of hivewire's ``butterfly_allreduce``
between separate peer processes, over:

* ``tcp``: a plain length-prefixed TCP connection per pair (bench/_tcp.py), the baseline transport;
* ``webrtc untuned`` / ``webrtc tuned`` / ``direct TLS``: the project's mesh Links (LinkGroupTransport over
  mesh.Link, offers and answers passed over pipes, bench/_links.py); a path the installed client lacks
  prints ``n/a``;
* ``gloo``: torch.distributed ``all_reduce`` (sum) of the same tensor in the same processes,

on two networks:

* ``loopback``: everything on 127.0.0.1 (gloo pinned to ``lo``); 2 and 4 peers over TCP with codecs
  none/fp16/int8, 2 peers over each Link path with codecs none/int8; 10 MB and 100 MB float32;
* ``wan``: peers in network namespaces behind an emulated WAN (bench/_wan.py: ``--delay-ms`` one way, so
  RTT twice that, and ``--rate-mbit`` per peer each way; tbf qdiscs for the rates and a user-space NFQUEUE
  delay line, bench/_delay.py, since this kernel has no netem; needs root), 2 and 4 peers, codec none.
  Under the table: packets each job lost at the rate limiters (congestion), at the peers' UDP sockets (a
  receiver too slow to read) and in the delay line (a fault of the emulation), and how late the delay line
  released packets on average.

Columns: ``t/gloo`` and ``t/tcp`` are time ratios against the gloo and TCP rows of the same network, peers
and size (and codec, for TCP); ``untuned/t`` is the speedup over the untuned WebRTC row; ``bound`` is the
bandwidth-optimal 2(n-1)/n * size / bandwidth (``--bandwidth-mbit`` on loopback, ``--rate-mbit`` on the
WAN) and ``%bound`` = bound / time (fp32 bytes before compression, so compressed rows can pass 100%).
Results are checked, not assumed: every peer of a round must end with the same bits, and codec ``none``
rows must agree bit for bit across transports. Each process runs torch on one thread. It never asserts on
times; the load average is printed beside the table, since other work on the machine skews every row.

Usage::

    python bench/averaging.py                      # everything (a few minutes; WAN rows need root)
    python bench/averaging.py --quick              # 2 peers, small sizes, 1 round: about a minute idle
    python bench/averaging.py --paths webrtc-tuned direct-tls --no-wan
    python bench/averaging.py --wan-only --wan-peers 2 4 --wan-mb 10 50
    python bench/averaging.py --wan-only --delay-ms 0    # rates alone: is a path limited by RTT or by CPU?

The untuned WebRTC rows are slow (~20 MB/s on an idle machine, far less under load): they get
``--untuned-repeat`` rounds (default 1). The direct TLS rows run tuned where tuning is built, as the
network process does.
"""

import argparse
import asyncio
import hashlib
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.synchronize import Barrier
from typing import Any

import _links
import _wan
import torch
import torch.distributed as dist
from _tcp import connect_tcp_group

from hivewire.averaging import ButterflySettings, GroupTransport, LinkGroupTransport, butterfly_allreduce, get_codec

LOOPBACK = "127.0.0.1"
CODECS = ("none", "fp16", "int8")
LINK_CODECS = ("none", "int8")
SETTINGS = ButterflySettings(reduce_timeout_s=120.0, gather_timeout_s=120.0)
BARRIER_TIMEOUT_S = 300.0  # a peer stuck this long at a barrier means another one failed
JOB_TIMEOUT_S = 1800.0  # one set of peer processes, all its rounds
SETUP_RETRIES = 2  # a direct path that did not come up in time (a handshake on a loaded machine) is tried again
NS_PORT = 47_000  # inside a namespace nothing else listens: rank r uses NS_PORT + r, gloo NS_PORT + 100

Key = tuple[str, int, str]  # (method, tensor bytes, codec)


@dataclass(frozen=True)
class Job:
    """One set of peer processes and what they measure: gloo + butterfly over TCP, or butterfly over Links."""

    method: str  # "tcp" or one of _links.PATHS
    peers: int
    sizes: tuple[int, ...]
    codecs: tuple[str, ...]
    repeat: int
    hosts: tuple[str, ...]  # each rank's address
    ports: tuple[int, ...]  # each rank's TCP port, then gloo's rendezvous port
    namespaces: tuple[str, ...] = ()  # each rank's network namespace, or () for this one
    interface: str = "lo"  # where gloo's sockets go
    stripes: int = 1  # Links per pair of peers, messages striped over them (LinkGroupTransport)

    @property
    def name(self) -> str:
        """The row's method: the path, and how many stripes when more than one."""
        return self.method if self.stripes == 1 else f"{self.method} x{self.stripes}"


@dataclass
class Outcome:
    """What a job's peers reported: per key the rounds' times (slowest peer), and the result digests."""

    times: dict[Key, list[float]] = field(default_factory=dict)
    digests: dict[Key, str] = field(default_factory=dict)
    error: str | None = None
    retry: bool = False  # the error was a path that did not come up: building the group again may work


def _tensor(numel: int, rank: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(rank))


def _wait(barrier: Barrier) -> None:
    barrier.wait(BARRIER_TIMEOUT_S)


def _gloo(job: Job, rank: int) -> dict[Key, list[float]]:
    os.environ["GLOO_SOCKET_IFNAME"] = job.interface
    dist.init_process_group(
        "gloo", init_method=f"tcp://{job.hosts[0]}:{job.ports[-1]}", rank=rank, world_size=job.peers
    )
    times: dict[Key, list[float]] = {}
    try:
        for size in job.sizes:
            tensor = _tensor(size // 4, rank)
            for attempt in range(job.repeat + 1):  # the first is a warm-up
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(tensor)
                if attempt:
                    times.setdefault(("gloo", size, "none"), []).append(time.perf_counter() - start)
    finally:
        dist.destroy_process_group()
    return times


async def _rounds(
    job: Job, rank: int, transport: GroupTransport, barrier: Barrier
) -> tuple[dict[Key, list[float]], dict[Key, str]]:
    """Timed butterfly rounds for every size and codec; the last round's result digest per key."""
    throughputs = {f"peer{i}": 1.0 for i in range(job.peers)}
    times: dict[Key, list[float]] = {}
    digests: dict[Key, str] = {}
    for size in job.sizes:
        tensor = _tensor(size // 4, rank)
        for codec in job.codecs:
            key = (job.name, size, codec)
            for attempt in range(job.repeat + 1):
                await asyncio.to_thread(_wait, barrier)  # never block the loop: it still flushes our sends
                start = time.perf_counter()
                result, report = await butterfly_allreduce(
                    tensor,
                    me=f"peer{rank}",
                    throughputs=throughputs,
                    weight=1.0,
                    round_id=f"{size}-{codec}-{attempt}",
                    transport=transport,
                    codec=get_codec(codec),
                    settings=SETTINGS,
                )
                elapsed = time.perf_counter() - start
                if report.excluded:
                    raise RuntimeError(f"round {size}-{codec}-{attempt} lost members: {report.excluded}")
                if attempt:
                    times.setdefault(key, []).append(elapsed)
                if attempt == job.repeat:
                    digests[key] = hashlib.sha256(result.numpy()).hexdigest()
                # Dropped before the next round, as the network process does once it copied the result:
                # its memory then serves the next round's buffers (hivewire/buffers.py).
                del result, report
    return times, digests


async def _over_tcp(job: Job, rank: int, barrier: Barrier) -> tuple[dict[Key, list[float]], dict[Key, str]]:
    transport = await connect_tcp_group(rank, list(zip(job.hosts, job.ports[: job.peers], strict=True)), barrier)
    try:
        measured = await _rounds(job, rank, transport, barrier)
        await asyncio.to_thread(_wait, barrier)  # nobody closes while another still reads
        return measured
    finally:
        transport.close()


async def _over_links(
    job: Job, rank: int, barrier: Barrier, pipes: dict[int, Connection]
) -> tuple[dict[Key, list[float]], dict[Key, str]]:
    group = await _links.open_links(rank, pipes, host=job.hosts[rank], path=job.method, stripes=job.stripes)
    try:
        measured = await _rounds(job, rank, LinkGroupTransport(group.stripes), barrier)
        _links.check_still_on_path(group, job.method)  # before the barrier: after it, others close their links
        await asyncio.to_thread(_wait, barrier)  # nobody closes while another still reads
        return measured
    finally:
        await group.close()


def worker(job: Job, rank: int, barrier: Barrier, pipes: dict[int, Connection], result: Connection) -> None:
    """One peer: (gloo rounds, then) butterfly rounds; sends back (times, digests) or ("error", traceback)."""
    logging.basicConfig(level=logging.WARNING, format=f"peer {rank} %(levelname)s %(name)s: %(message)s")
    # Each link reports its peer gone when the group closes at the end: expected, not worth a line.
    logging.getLogger("hivewire.mesh.link").setLevel(logging.ERROR)
    try:
        if job.namespaces:
            _wan.enter_namespace(job.namespaces[rank])
        torch.set_num_threads(1)
        if job.method == "tcp":
            times = _gloo(job, rank)
            more, digests = asyncio.run(_over_tcp(job, rank, barrier))
            times.update(more)
        else:
            times, digests = _links.runner(job.method)(_over_links(job, rank, barrier, pipes))
        result.send((times, digests))
    except _links.PathNotUp as exc:
        barrier.abort()
        result.send(("retry", f"peer {rank}: {exc}"))
    except BaseException:
        barrier.abort()  # the other peers stop waiting for us
        result.send(("error", f"peer {rank}: {traceback.format_exc()}"))
    finally:
        result.close()


def _free_ports(count: int) -> tuple[int, ...]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind((LOOPBACK, 0))
    ports = tuple(sock.getsockname()[1] for sock in sockets)
    for sock in sockets:
        sock.close()
    return ports


def run_job(job: Job) -> Outcome:
    """Run the job's peer processes; per key, the median over rounds of the slowest peer's time."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(job.peers)
    results = [context.Pipe(duplex=False) for _ in range(job.peers)]
    pipes: list[dict[int, Connection]] = [{} for _ in range(job.peers)]
    if job.method != "tcp":
        for a in range(job.peers):
            for b in range(a + 1, job.peers):
                pipes[a][b], pipes[b][a] = context.Pipe(duplex=True)
    processes = [
        context.Process(target=worker, args=(job, rank, barrier, pipes[rank], results[rank][1]), daemon=True)
        for rank in range(job.peers)
    ]
    for process in processes:
        process.start()
    for _, sending in results:
        sending.close()  # ours: a peer that dies without a word then reads as EOF
    outcome = Outcome()
    replies: dict[int, Any] = {}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    pending: dict[Connection, int] = {receiving: rank for rank, (receiving, _) in enumerate(results)}
    while pending and time.monotonic() < deadline:
        for ready in wait(list(pending), timeout=5.0):
            assert isinstance(ready, Connection)
            rank = pending.pop(ready)
            try:
                replies[rank] = ready.recv()
            except EOFError:
                replies[rank] = ("error", f"peer {rank} exited without a result")
    for process in processes:
        process.join(10.0)
        if process.is_alive():
            process.kill()
            process.join()
    errors = [reply[1] for reply in replies.values() if reply[0] in ("error", "retry")]
    if pending:
        errors.append(f"peers {sorted(pending.values())} sent nothing within {JOB_TIMEOUT_S} s")
    if errors:
        outcome.error = errors[0]
        outcome.retry = all(reply[0] == "retry" for reply in replies.values() if reply[0] in ("error", "retry"))
        return outcome
    per_rank = [replies[rank] for rank in range(job.peers)]
    for key in per_rank[0][0]:
        rounds = len(per_rank[0][0][key])
        outcome.times[key] = [max(times[key][i] for times, _ in per_rank) for i in range(rounds)]
    for key, digest in per_rank[0][1].items():
        if any(digests[key] != digest for _, digests in per_rank):
            outcome.error = f"{key}: peers ended the round with different results"
        outcome.digests[key] = digest
    return outcome


@dataclass
class Row:
    """One table row: a measured median round time, or None with the reason in ``note``."""

    network: str  # "loopback" or "wan"
    peers: int
    size: int
    codec: str
    method: str
    seconds: float | None
    note: str = ""


@dataclass
class Bench:
    """Collects rows and every failure; prints the table at the end."""

    args: argparse.Namespace
    rows: list[Row] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed under the table: what the WAN emulation did
    digests: dict[tuple[str, int, int, str], dict[str, str]] = field(default_factory=dict)

    def measure(self, network: str, job: Job) -> None:
        label = f"{network} {job.peers} peers {job.name}"
        print(f"... {label}: {', '.join(f'{s / 1e6:g} MB' for s in job.sizes)}", file=sys.stderr, flush=True)
        outcome = run_job(job)
        for _ in range(SETUP_RETRIES):
            if not outcome.retry:
                break
            print(f"... {label}: {outcome.error}; building the group again", file=sys.stderr, flush=True)
            outcome = run_job(job)
        if outcome.error is not None:
            self.failures.append(f"{label}: {outcome.error}")
        methods = ("gloo", job.name) if job.method == "tcp" else (job.name,)
        for method in methods:
            for size in job.sizes:
                for codec in ("none",) if method == "gloo" else job.codecs:
                    times = outcome.times.get((method, size, codec))
                    seconds = statistics.median(times) if times else None
                    self.rows.append(Row(network, job.peers, size, codec, method, seconds, "" if times else "error"))
        for (method, size, codec), digest in outcome.digests.items():
            self.digests.setdefault((network, job.peers, size, codec), {})[method] = digest

    def skip(
        self, network: str, peers: int, sizes: tuple[int, ...], codecs: tuple[str, ...], method: str, why: str
    ) -> None:
        for size in sizes:
            for codec in codecs:
                self.rows.append(Row(network, peers, size, codec, method, None, why))

    def check_agreement(self) -> None:
        """Codec none must give the same bits whichever transport carried the round."""
        for (network, peers, size, codec), by_method in sorted(self.digests.items()):
            if codec == "none" and len(set(by_method.values())) > 1:
                self.failures.append(f"{network} {peers} peers {size} B: results differ across {sorted(by_method)}")

    def print_table(self, started: float) -> None:
        find = {(r.network, r.peers, r.size, r.codec, r.method): r.seconds for r in self.rows}
        header = (
            f"{'network':<8} {'peers':>5} {'size':>7} {'codec':>5} {'path':<17} {'round s':>8} {'t/gloo':>8} "
            f"{'t/tcp':>6} {'untuned/t':>9} {'bound s':>8} {'%bound':>6} {'MB/s':>6}"
        )
        print(header)
        print("-" * len(header))
        for row in self.rows:
            bandwidth = (self.args.rate_mbit if row.network == "wan" else self.args.bandwidth_mbit) * 1e6 / 8
            moved = 2 * (row.peers - 1) / row.peers * row.size
            bound = moved / bandwidth
            path, _, stripes = row.method.partition(" ")
            name = " ".join(filter(None, (_links.PATH_LABELS.get(path, path), stripes)))
            start = f"{row.network:<8} {row.peers:>5} {row.size / 1e6:>5g}MB {row.codec:>5} {name:<17}"
            if row.seconds is None:
                print(f"{start} {row.note}")
                continue
            ratios = []
            for method, invert in (("gloo", False), ("tcp", False), ("webrtc-untuned", True)):
                codec = "none" if method == "gloo" else row.codec
                base = find.get((row.network, row.peers, row.size, codec, method))
                if not base or row.method in ("gloo", method) or (method != "gloo" and row.method == "tcp"):
                    ratios.append("")
                else:
                    ratios.append(f"{(base / row.seconds if invert else row.seconds / base):.2f}x")
            print(
                f"{start} {row.seconds:>8.3f} {ratios[0]:>8} {ratios[1]:>6} {ratios[2]:>9} {bound:>8.3f} "
                f"{100 * bound / row.seconds:>5.0f}% {moved / row.seconds / 1e6:>6.0f}"
            )
        if self.notes:
            print("\n" + "\n".join(self.notes))
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        print(
            f"\nmedian of {self.args.repeat} round(s) after a warm-up (untuned WebRTC: {self.args.untuned_repeat}); "
            f"loopback bound at {self.args.bandwidth_mbit:g} Mbit/s, WAN {self.args.rate_mbit:g} Mbit/s each way "
            f"and {2 * self.args.delay_ms:g} ms RTT; MB/s = 2(n-1)/n * size / time (fp32 bytes)\n"
            f"{os.cpu_count()} CPU(s), load average {load} (other work skews every row), "
            f"{time.perf_counter() - started:.0f} s in all"
        )


def _sizes(megabytes: list[float]) -> tuple[int, ...]:
    return tuple(int(mb * 1e6) // 4 * 4 for mb in megabytes)


def loopback(bench: Bench) -> None:
    args = bench.args
    sizes = _sizes(args.sizes_mb)
    for peers in args.peers:
        ports = _free_ports(peers + 1)
        bench.measure("loopback", Job("tcp", peers, sizes, CODECS, args.repeat, (LOOPBACK,) * peers, ports))
    link_sizes = _sizes(args.link_mb)
    for path in args.paths:
        why = _links.unavailable(path)
        if why is not None:
            bench.skip("loopback", 2, link_sizes, LINK_CODECS, path, why)
            continue
        repeat = args.untuned_repeat if path == "webrtc-untuned" else args.repeat
        bench.measure("loopback", Job(path, 2, link_sizes, LINK_CODECS, repeat, (LOOPBACK,) * 2, ()))
        if args.stripes > 1 and path.startswith("webrtc"):
            job = Job(path, 2, link_sizes, LINK_CODECS, repeat, (LOOPBACK,) * 2, (), stripes=args.stripes)
            bench.measure("loopback", job)


def wan(bench: Bench) -> None:
    args = bench.args
    sizes = _sizes(args.wan_mb)
    why = _wan.unavailable()
    for peers in args.wan_peers:
        if why is not None:
            bench.skip("wan", peers, sizes, ("none",), "tcp", f"n/a ({why})")
            continue
        with _wan.WanLab(peers, delay_ms=args.delay_ms, rate_mbit=args.rate_mbit) as lab:
            hosts = tuple(lab.addresses)
            ports = (*(NS_PORT + rank for rank in range(peers)), NS_PORT + 100)
            spaces = tuple(lab.namespaces)
            jobs = [Job("tcp", peers, sizes, ("none",), args.repeat, hosts, ports, spaces, "eth0")]
            for path in args.paths:
                unusable = _links.unavailable(path)
                if unusable is not None:
                    bench.skip("wan", peers, sizes, ("none",), path, unusable)
                    continue
                repeat = args.untuned_repeat if path == "webrtc-untuned" else args.repeat
                jobs.append(Job(path, peers, sizes, ("none",), repeat, hosts, (), spaces, "eth0"))
                if args.stripes > 1 and path.startswith("webrtc"):
                    jobs.append(Job(path, peers, sizes, ("none",), repeat, hosts, (), spaces, "eth0", args.stripes))
            for job in jobs:
                before = lab.drops()
                bench.measure("wan", job)
                dropped = ", ".join(f"{where} {count - before[where]}" for where, count in lab.drops().items())
                bench.notes.append(f"wan {peers} peers {job.name}: packets dropped: {dropped}")
        if lab.delay_report:
            bench.notes.append(f"wan {peers} peers: {lab.delay_report}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 peers, 4 MB everywhere, 1 round")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per row (after one warm-up)")
    parser.add_argument("--untuned-repeat", type=int, default=1, help="timed rounds of the untuned WebRTC rows")
    parser.add_argument("--sizes-mb", type=float, nargs="+", help="loopback tensor sizes (default 10 100)")
    parser.add_argument("--link-mb", type=float, nargs="+", help="loopback sizes over Links (default: --sizes-mb)")
    parser.add_argument("--peers", type=int, nargs="+", help="loopback group sizes over TCP (default 2 4)")
    parser.add_argument("--paths", nargs="*", choices=_links.PATHS, default=list(_links.PATHS), help="Link paths")
    parser.add_argument(
        "--stripes", type=int, default=2, help="WebRTC rows also run striped over this many Links per pair (1: not)"
    )
    parser.add_argument("--bandwidth-mbit", type=float, default=1000.0, help="loopback bound's link speed")
    parser.add_argument("--no-wan", action="store_true", help="leave out the emulated WAN rows")
    parser.add_argument("--wan-only", action="store_true", help="only the emulated WAN rows")
    parser.add_argument("--wan-peers", type=int, nargs="+", help="WAN group sizes (default 2 4)")
    parser.add_argument("--wan-mb", type=float, nargs="+", help="WAN tensor sizes (default 10)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="WAN one-way delay (RTT is twice it)")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="WAN rate per peer, each way")
    args = parser.parse_args()
    if args.quick:
        args.repeat = min(args.repeat, 1)
    args.sizes_mb = args.sizes_mb or ([4] if args.quick else [10, 100])
    args.peers = args.peers or ([2] if args.quick else [2, 4])
    args.link_mb = args.link_mb or ([4] if args.quick else args.sizes_mb)
    args.wan_peers = args.wan_peers or ([2] if args.quick else [2, 4])
    args.wan_mb = args.wan_mb or ([4] if args.quick else [10])
    args.untuned_repeat = min(args.untuned_repeat, args.repeat)
    # gloo warns that a namespace's peer has no host name, once per socket: noise, not news.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    started = time.perf_counter()
    bench = Bench(args)
    if not args.wan_only:
        loopback(bench)
    if not args.no_wan:
        wan(bench)
    bench.check_agreement()
    bench.print_table(started)
    for failure in bench.failures:
        print(f"\nFAILED {failure}", file=sys.stderr)
    sys.exit(1 if bench.failures else 0)


if __name__ == "__main__":
    main()
