"""Averaging benchmark: one butterfly round against torch.distributed (gloo) all_reduce, same machine, same run.

Prints one table: for 2 and 4 peers and 10 MB / 100 MB float32 tensors, the median wall time of one round
(the slowest peer's time, each round started together behind a barrier) of

* hivewire's ``butterfly_allreduce`` over loopback TCP between separate processes (a length-prefixed
  connection per pair, ``TcpGroupTransport`` below; the mesh's aiortc Links run at ~20 MB/s in pure Python,
  shared/notes/webrtc-field-notes.md, which would measure SCTP rather than averaging), codec ``none`` and
  the compressed ``fp16`` / ``int8`` for comparison;
* gloo ``all_reduce`` (sum) of the same tensor in the same processes,

their ratio, and the bandwidth-optimal bound 2·(n−1)/n·size/bandwidth at ``--bandwidth-mbit`` (a link of
that speed, full duplex, per peer). Everything stays on 127.0.0.1 (gloo pinned to ``lo``). Each process
runs torch on one thread, so several peers on few cores compete as little as they can. It never asserts on
times. Usage: ``python bench/averaging.py [--quick] [--repeat 3] [--bandwidth-mbit 1000]``.
"""

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier

import torch
import torch.distributed as dist

from hivewire.averaging import ButterflySettings, PeerUnreachable, butterfly_allreduce, get_codec

LOOPBACK = "127.0.0.1"
CODECS = ("none", "fp16", "int8")
MAX_MESSAGE_BYTES = 2**30  # the largest message a benchmark peer accepts
SETUP_TIMEOUT_S = 60.0
SETTINGS = ButterflySettings(reduce_timeout_s=120.0, gather_timeout_s=120.0)

Key = tuple[str, int, str]  # (method, tensor bytes, codec)


class _Stream(asyncio.BufferedProtocol):
    """One TCP connection carrying 8-byte little-endian lengths, each followed by a message.

    Each message is received straight into a buffer of its size (asyncio's StreamReader would copy every
    chunk into a growing buffer, then once more out of it, which costs more than the averaging at 100 MB).
    The first message on a connection is the dialer's rank.
    """

    def __init__(self, group: "TcpGroupTransport") -> None:
        self.group = group
        self.peer: str | None = None
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[bytearray | None] = asyncio.Queue()
        self.writable = asyncio.Event()
        self.writable.set()
        self._header = bytearray(8)
        self._body: bytearray | None = None
        self._filled = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._header if self._body is None else self._body)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._body is None:
            if self._filled == len(self._header):
                size = int.from_bytes(self._header, "little")
                if size > MAX_MESSAGE_BYTES:
                    assert self.transport is not None
                    self.transport.close()
                    return
                self._body, self._filled = bytearray(size), 0
        elif self._filled == len(self._body):
            self._deliver(self._body)
            self._body, self._filled = None, 0

    def _deliver(self, message: bytearray) -> None:
        if self.peer is None:
            self.peer = f"peer{int.from_bytes(message, 'little')}"
            self.group.add(self.peer, self)
        else:
            self.queue.put_nowait(message)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)
        self.writable.set()

    async def send(self, data: bytes | bytearray) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            raise PeerUnreachable(f"connection to {self.peer} closed")
        self.transport.write(len(data).to_bytes(8, "little"))
        self.transport.write(data)
        await self.writable.wait()


class TcpGroupTransport:
    """A GroupTransport over one loopback TCP connection per pair of peers."""

    def __init__(self, expected: int) -> None:
        self.streams: dict[str, _Stream] = {}
        self.expected = expected
        self.connected = asyncio.Event()
        if expected == 0:
            self.connected.set()

    def add(self, peer: str, stream: _Stream) -> None:
        self.streams[peer] = stream
        if len(self.streams) == self.expected:
            self.connected.set()

    async def send(self, peer: str, data: bytes | bytearray) -> None:
        await self.streams[peer].send(data)

    async def recv(self, peer: str, *, timeout_s: float) -> bytes | bytearray:
        queue = self.streams[peer].queue
        async with asyncio.timeout(timeout_s):
            data = await queue.get()
        if data is None:
            queue.put_nowait(None)
            raise PeerUnreachable(f"connection from {peer} closed")
        return data

    def close(self) -> None:
        for stream in self.streams.values():
            if stream.transport is not None:
                stream.transport.close()


async def _connect_mesh(rank: int, ports: list[int], barrier: Barrier) -> tuple[TcpGroupTransport, asyncio.Server]:
    """Every rank listens on its port, waits until all do, and dials the ranks below it (saying who it is)."""
    loop = asyncio.get_running_loop()
    group = TcpGroupTransport(expected=len(ports) - 1)
    server = await loop.create_server(lambda: _Stream(group), LOOPBACK, ports[rank])
    await asyncio.to_thread(barrier.wait)
    for other in range(rank):
        _, stream = await loop.create_connection(lambda: _Stream(group), LOOPBACK, ports[other])
        stream.peer = f"peer{other}"
        group.add(stream.peer, stream)
        await stream.send(rank.to_bytes(8, "little"))
    await asyncio.wait_for(group.connected.wait(), SETUP_TIMEOUT_S)
    return group, server


def _tensor(numel: int, rank: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(rank))


def _gloo(rank: int, sizes: list[int], repeat: int) -> dict[Key, list[float]]:
    times: dict[Key, list[float]] = {}
    for size in sizes:
        tensor = _tensor(size // 4, rank)
        for attempt in range(repeat + 1):  # the first is a warm-up
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            if attempt:
                times.setdefault(("gloo", size, "none"), []).append(time.perf_counter() - start)
    return times


async def _butterfly(
    rank: int, n: int, ports: list[int], barrier: Barrier, sizes: list[int], repeat: int
) -> dict[Key, list[float]]:
    transport, server = await _connect_mesh(rank, ports, barrier)
    throughputs = {f"peer{i}": 1.0 for i in range(n)}
    times: dict[Key, list[float]] = {}
    try:
        for size in sizes:
            tensor = _tensor(size // 4, rank)
            for codec in CODECS:
                for attempt in range(repeat + 1):
                    await asyncio.to_thread(barrier.wait)  # never block the loop: it still flushes our sends
                    start = time.perf_counter()
                    _, report = await butterfly_allreduce(
                        tensor,
                        me=f"peer{rank}",
                        throughputs=throughputs,
                        weight=1.0,
                        round_id=f"{size}-{codec}-{attempt}",
                        transport=transport,
                        codec=get_codec(codec),
                        settings=SETTINGS,
                    )
                    if report.excluded:
                        raise RuntimeError(f"benchmark round lost members: {report.excluded}")
                    if attempt:
                        times.setdefault(("hivewire", size, codec), []).append(time.perf_counter() - start)
        await asyncio.to_thread(barrier.wait)  # nobody closes while another still reads
    finally:
        transport.close()
        server.close()
    return times


def worker(
    rank: int,
    n: int,
    ports: list[int],
    gloo_port: int,
    barrier: Barrier,
    sizes: list[int],
    repeat: int,
    conn: Connection,
) -> None:
    """One peer: gloo rounds, then butterfly rounds; sends back {key: [seconds per round]}."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK}:{gloo_port}", rank=rank, world_size=n)
    try:
        times = _gloo(rank, sizes, repeat)
    finally:
        dist.destroy_process_group()
    times.update(asyncio.run(_butterfly(rank, n, ports, barrier, sizes, repeat)))
    conn.send(times)
    conn.close()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind((LOOPBACK, 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def measure(n: int, sizes: list[int], repeat: int) -> dict[Key, float]:
    """Run ``n`` peer processes; per key, the median over rounds of the slowest peer's time."""
    context = multiprocessing.get_context("spawn")
    ports = _free_ports(n + 1)
    barrier = context.Barrier(n)
    pipes = [context.Pipe(duplex=False) for _ in range(n)]
    processes = [
        context.Process(target=worker, args=(rank, n, ports[:n], ports[n], barrier, sizes, repeat, pipes[rank][1]))
        for rank in range(n)
    ]
    for process in processes:
        process.start()
    per_rank = [receiving.recv() for receiving, _ in pipes]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a benchmark peer exited with {process.exitcode}")
    return {
        key: statistics.median(max(rank_times[key][i] for rank_times in per_rank) for i in range(repeat))
        for key in per_rank[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 MB and 10 MB tensors instead of 10 MB and 100 MB")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per row (after one warm-up)")
    parser.add_argument("--bandwidth-mbit", type=float, default=1000.0, help="link speed for the bound column")
    args = parser.parse_args()
    sizes = [10**6, 10**7] if args.quick else [10**7, 10**8]
    bandwidth = args.bandwidth_mbit * 1e6 / 8
    started = time.perf_counter()
    header = (
        f"{'peers':>5} {'size':>7} {'codec':>5} {'hivewire s':>10} {'gloo s':>8} {'ratio':>6} "
        f"{'bound s':>8} {'hivewire MB/s':>13}"
    )
    print(f"one averaging round, median of {args.repeat}; bound = 2(n-1)/n * size / {args.bandwidth_mbit:g} Mbit/s")
    print(header)
    print("-" * len(header))
    for n in (2, 4):
        results = measure(n, sizes, args.repeat)
        for size in sizes:
            gloo = results[("gloo", size, "none")]
            moved = 2 * (n - 1) / n * size
            for codec in CODECS:
                ours = results[("hivewire", size, codec)]
                print(
                    f"{n:>5} {size // 10**6:>5}MB {codec:>5} {ours:>10.3f} {gloo:>8.3f} {ours / gloo:>5.1f}x "
                    f"{moved / bandwidth:>8.3f} {moved / ours / 1e6:>13.0f}"
                )
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"\nall on {LOOPBACK}, {os.cpu_count()} CPU(s), load average {load} (other work skews every row), "
        f"{time.perf_counter() - started:.0f} s in all; MB/s = 2(n-1)/n * size / time (fp32 bytes, before compression)"
    )


if __name__ == "__main__":
    main()
