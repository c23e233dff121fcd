"""Transport benchmark on loopback: framing cost, SCTP tuning gain and the direct TLS path, against baselines.

Prints one table, with baselines from the same run and ratios; it never asserts on time.

* asyncio TCP, two processes: the ceiling of the machine;
* raw aiortc: one pre-negotiated data channel, 262,144-byte messages, bufferedAmount backpressure, no
  framing or checksum: what our framing is measured against;
* aiortc untuned: one hivewire Link (framing, SHA-256, credit, keepalive) on stock aiortc and asyncio;
* several untuned Links at once in the same process pair;
* aiortc tuned (uvloop + SCTP): the same Link with hivewire.mesh.tuning in both processes (its target:
  >= 2.5x untuned);
* raw mutual-TLS socket: one TLS 1.3 connection set up as the direct path sets up its own, 1 MiB writes
  read into one reused buffer, no framing or checksum: the ceiling of the direct path;
* direct TLS link: two Links whose bulk payloads take the direct mutual-TLS TCP path (target >= 500 MB/s),
  on the event loop the network process runs (``tuning.run``: uvloop where installed), and again on
  asyncio's own loop; rows left out when the installed client lacks the path;
* with ``--mixed``: one side tuned, the other not, as during an upgrade.

Sender and receiver run in two processes: in one process aiortc runs at half speed (the two ends share a
core; shared/notes/webrtc-field-notes.md). Host candidates are restricted to 127.0.0.1: nothing leaves
loopback. Usage: ``python bench/transport.py [--mb 32] [--links 3] [--repeat 3] [--mixed]``."""

import argparse
import asyncio
import hashlib
import logging
import multiprocessing
import os
import ssl
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import _links  # bench/_links.py: the direct-TLS Links between two processes, shared with bench/averaging.py
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdtlstransport import RTCCertificate

from hivewire.mesh import (
    FramingLimits,
    Link,
    LinkSettings,
    PayloadDecoder,
    build_configuration,
    encode_payload,
    restrict_host_addresses,
    tuning,
)
from hivewire.mesh.framing import MAX_MESSAGE_BYTES
from hivewire.mesh.tuning import apply_sctp_tuning, remove_sctp_tuning

LOOPBACK = "127.0.0.1"
PAYLOAD_BYTES = 16 * 2**20  # one framed payload; an averaging part is of this order
TCP_WRITE_BYTES = 2**20
SETUP_TIMEOUT_S = 30.0


@dataclass
class Result:
    """One measured transfer: receiver-side wall time and each side's CPU time over its window."""

    name: str
    total_bytes: int
    elapsed_s: float
    sender_cpu_s: float
    receiver_cpu_s: float

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / self.elapsed_s / 1e6

    def cpu_percent(self, cpu_s: float) -> float:
        return 100 * cpu_s / self.elapsed_s


async def _recv(conn: Connection) -> Any:
    """Read from the pipe without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


def _new_peer_connection() -> RTCPeerConnection:
    return RTCPeerConnection(build_configuration([]))


def _channel(pc: RTCPeerConnection) -> RTCDataChannel:
    return pc.createDataChannel("bench", negotiated=True, id=1)


async def _wait_open(channel: RTCDataChannel) -> None:
    async with asyncio.timeout(SETUP_TIMEOUT_S):
        while channel.readyState != "open":  # noqa: ASYNC110 - setup only, not measured
            await asyncio.sleep(0.01)


# --- receiver process --------------------------------------------------------------------------------


def receiver_main(conn: Connection, mode: str, links: int, total: int, tuned: bool) -> None:
    """Entry point of the receiving process."""
    # The sender closes first, so this side's links report their peer gone: expected, not worth a line.
    logging.basicConfig(level=logging.ERROR)
    restrict_host_addresses([LOOPBACK])
    if mode == "tcp":
        receiver = _tcp_receiver(conn, total)
    elif mode == "tls":
        receiver = _tls_receiver(conn, total)
    elif mode == "direct":
        receiver = _direct_receiver(conn, total)
    else:
        receiver = _rtc_receiver(conn, mode, links, total)
    if tuned and apply_sctp_tuning():
        tuning.run(receiver)
    else:
        asyncio.run(receiver)


async def _tcp_receiver(conn: Connection, total: int) -> None:
    done = asyncio.Event()
    window: dict[str, float] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = 0
        window["t0"], window["cpu0"] = time.perf_counter(), time.process_time()
        while received < total:
            chunk = await reader.read(4 * 2**20)
            if not chunk:
                break
            received += len(chunk)
        window["t1"], window["cpu1"] = time.perf_counter(), time.process_time()
        writer.close()
        done.set()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    conn.send(server.sockets[0].getsockname()[1])
    await done.wait()
    server.close()
    conn.send((window["t1"] - window["t0"], window["cpu1"] - window["cpu0"]))


class _TlsSink(asyncio.BufferedProtocol):
    """Reads a raw TLS stream into one reused buffer and counts: the least a TLS receiver can do."""

    def __init__(self, total: int, done: asyncio.Event, window: dict[str, float]) -> None:
        self.buffer = memoryview(bytearray(2**20))
        self.total, self.received, self.done, self.window = total, 0, done, window

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # after the TLS handshake
        self.window["t0"], self.window["cpu0"] = time.perf_counter(), time.process_time()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self.received >= self.total and not self.done.is_set():
            self.window["t1"], self.window["cpu1"] = time.perf_counter(), time.process_time()
            self.done.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()


def _tls_context(pem: bytes, *, server: bool) -> ssl.SSLContext:
    """Mutual TLS 1.3 as the direct path sets it up (mesh/direct.py), one self-signed certificate both ways."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from hivewire.mesh import direct

    certificate = RTCCertificate(load_pem_private_key(pem, None), x509.load_pem_x509_certificate(pem))
    make = direct._server_context if server else direct._client_context
    return make(certificate, certificate._cert)


def _tls_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization

    certificate = RTCCertificate.generateCertificate()
    key = certificate._key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key + certificate._cert.public_bytes(serialization.Encoding.PEM)


async def _tls_receiver(conn: Connection, total: int) -> None:
    context = _tls_context(await _recv(conn), server=True)
    done = asyncio.Event()
    window: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _TlsSink(total, done, window), LOOPBACK, 0, ssl=context)
    conn.send(server.sockets[0].getsockname()[1])
    await done.wait()
    server.close()
    conn.send((window["t1"] - window["t0"], window["cpu1"] - window["cpu0"]))
    await _recv(conn)


async def _rtc_receiver(conn: Connection, mode: str, count: int, total: int) -> None:
    pcs = [_new_peer_connection() for _ in range(count)]
    share = total // count
    channels = [_channel(pc) for pc in pcs] if mode == "raw" else []
    links = [Link(pc, peer=f"sender-{i}") for i, pc in enumerate(pcs)] if mode != "raw" else []
    answers = []
    for pc, (sdp, kind) in zip(pcs, await _recv(conn), strict=True):
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        await pc.setLocalDescription(await pc.createAnswer())
        answers.append((pc.localDescription.sdp, pc.localDescription.type))
    conn.send(answers)
    window: dict[str, float] = {}

    def started() -> None:
        if "t0" not in window:
            window["t0"], window["cpu0"] = time.perf_counter(), time.process_time()

    if mode == "raw":
        finished = [asyncio.Event() for _ in channels]
        for channel, event in zip(channels, finished, strict=True):
            received = [0]

            def on_message(message: bytes, received: list[int] = received, event: asyncio.Event = event) -> None:
                started()
                received[0] += len(message)
                if received[0] >= share:
                    event.set()

            channel.on("message", on_message)
        await asyncio.gather(*(event.wait() for event in finished))
    else:
        await asyncio.gather(*(link.wait_open() for link in links))
        for link in links:
            link.bulk_channel.on("message", lambda _: started())

        async def drain(link: Link) -> None:
            received = 0
            while received < share:
                _, payload = await link.recv_payload()
                received += len(payload)

        await asyncio.gather(*(drain(link) for link in links))
    window["t1"], window["cpu1"] = time.perf_counter(), time.process_time()
    conn.send((window["t1"] - window["t0"], window["cpu1"] - window["cpu0"]))
    await _recv(conn)  # the sender says when it is done, so neither side closes under the other
    for closing in links or pcs:
        await closing.close()


async def _direct_receiver(conn: Connection, total: int) -> None:
    group = await _links.open_links(1, {0: conn}, host=LOOPBACK, path="direct-tls")
    link = group.links["peer0"]
    await _recv(conn)  # the sender's path is up too: go
    t0, cpu0 = time.perf_counter(), time.process_time()
    received = 0
    while received < total:
        _, payload = await link.recv_payload()
        received += len(payload)
    conn.send((time.perf_counter() - t0, time.process_time() - cpu0))
    await _recv(conn)
    await group.close()


# --- sender (this process) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the table: a path, how many links at once, and which side runs the tuned aiortc."""

    name: str
    mode: str  # tcp, raw (one bare data channel) or link (hivewire Links)
    links: int
    total: int
    sender_tuned: bool = False
    receiver_tuned: bool = False


def measure(row: Row) -> Result:
    """Run one transfer of ``row.total`` bytes with a receiver in a fresh process."""
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=receiver_main, args=(child, row.mode, row.links, row.total, row.receiver_tuned), daemon=True
    )
    process.start()
    try:
        if row.mode == "tcp":
            sender = _tcp_sender(parent, row.total)
        elif row.mode == "tls":
            sender = _tls_sender(parent, row.total)
        elif row.mode == "direct":
            sender = _direct_sender(parent, row.total)
        else:
            sender = _rtc_sender(parent, row.mode, row.links, row.total)
        if row.sender_tuned and apply_sctp_tuning():
            try:
                sender_cpu_s = tuning.run(sender)
            finally:
                remove_sctp_tuning()  # the next row may be an untuned one
        else:
            sender_cpu_s = asyncio.run(sender)
        elapsed_s, receiver_cpu_s = parent.recv()
        parent.send("bye")
    finally:
        process.join(SETUP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
    return Result(row.name, row.total, elapsed_s, sender_cpu_s, receiver_cpu_s)


async def _tcp_sender(conn: Connection, total: int) -> float:
    port = await _recv(conn)
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    block = os.urandom(TCP_WRITE_BYTES)
    cpu0 = time.process_time()
    for _ in range(total // TCP_WRITE_BYTES):
        writer.write(block)
        await writer.drain()
    await reader.read()  # the receiver closes once it has everything
    writer.close()
    return time.process_time() - cpu0


async def _tls_sender(conn: Connection, total: int) -> float:
    pem = _tls_pem()
    conn.send(pem)
    port = await _recv(conn)
    _, writer = await asyncio.open_connection(LOOPBACK, port, ssl=_tls_context(pem, server=False))
    block = os.urandom(TCP_WRITE_BYTES)
    cpu0 = time.process_time()
    for _ in range(total // TCP_WRITE_BYTES):
        writer.write(block)
        await writer.drain()
    await asyncio.get_running_loop().run_in_executor(None, conn.poll, None)  # the receiver's report is in
    cpu_s = time.process_time() - cpu0
    writer.transport.abort()
    return cpu_s


async def _rtc_sender(conn: Connection, mode: str, count: int, total: int) -> float:
    pcs = [_new_peer_connection() for _ in range(count)]
    channels = [_channel(pc) for pc in pcs] if mode == "raw" else []
    links = [Link(pc, peer=f"receiver-{i}") for i, pc in enumerate(pcs)] if mode != "raw" else []
    for pc in pcs:
        await pc.setLocalDescription(await pc.createOffer())
    conn.send([(pc.localDescription.sdp, pc.localDescription.type) for pc in pcs])
    for pc, (sdp, kind) in zip(pcs, await _recv(conn), strict=True):
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
    share = total // count
    payload = os.urandom(min(PAYLOAD_BYTES, share))
    await asyncio.gather(*(_wait_open(channel) for channel in channels), *(link.wait_open() for link in links))
    cpu0 = time.process_time()
    if mode == "raw":
        await asyncio.gather(*(_send_raw(channel, share) for channel in channels))
    else:
        await asyncio.gather(*(_send_payloads(link, payload, share) for link in links))
    await asyncio.get_running_loop().run_in_executor(None, conn.poll, None)  # the receiver's report is in
    cpu_s = time.process_time() - cpu0
    for closing in links or pcs:
        await closing.close()
    return cpu_s


async def _direct_sender(conn: Connection, total: int) -> float:
    group = await _links.open_links(0, {1: conn}, host=LOOPBACK, path="direct-tls")
    link = group.links["peer1"]
    payload = os.urandom(min(PAYLOAD_BYTES, total))
    conn.send("go")
    cpu0 = time.process_time()
    await _send_payloads(link, payload, total)
    await asyncio.get_running_loop().run_in_executor(None, conn.poll, None)  # the receiver's report is in
    cpu_s = time.process_time() - cpu0
    await group.close()
    return cpu_s


async def _send_raw(channel: RTCDataChannel, share: int) -> None:
    """Send like the Link does (same message size, same buffer bounds), minus framing and checksum."""
    settings = LinkSettings()
    drained = asyncio.Event()
    channel.bufferedAmountLowThreshold = settings.buffer_low_bytes
    channel.on("bufferedamountlow", drained.set)
    message = os.urandom(MAX_MESSAGE_BYTES)
    for _ in range(-(-share // MAX_MESSAGE_BYTES)):
        while channel.bufferedAmount > settings.buffer_high_bytes:
            drained.clear()
            await drained.wait()
        channel.send(message)


async def _send_payloads(link: Link, payload: bytes, share: int) -> None:
    for _ in range(-(-share // len(payload))):
        await link.send_payload(payload)


def hash_speed(name: str, data: bytes) -> float:
    """MB/s of one hash over 256 KiB slices, as the framing feeds it."""
    view, start = memoryview(data), time.perf_counter()
    hasher = hashlib.new(name)
    for offset in range(0, len(view), MAX_MESSAGE_BYTES):
        hasher.update(view[offset : offset + MAX_MESSAGE_BYTES])
    return len(data) / (time.perf_counter() - start) / 1e6


def framing_cpu_ms_per_mb(data: bytes) -> tuple[float, float]:
    """CPU milliseconds per MB to frame (hash, slice, copy) and to reassemble and verify, without a network.

    Measured in isolation because aiortc's throughput on a shared box swings more than the framing costs.
    """
    start = time.process_time()
    frames = list(encode_payload(1, data, MAX_MESSAGE_BYTES))
    encode_s = time.process_time() - start
    decoder = PayloadDecoder(FramingLimits(max_payload_bytes=len(data)))
    start = time.process_time()
    for frame in frames:
        decoder.feed(frame)
    decode_s = time.process_time() - start
    megabytes = len(data) / 1e6
    return 1000 * encode_s / megabytes, 1000 * decode_s / megabytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=32, help="MiB per aiortc transfer (TCP moves 16x this)")
    parser.add_argument("--links", type=int, default=3, help="links at once in the x-links row")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, interleaved; each row shows its median")
    parser.add_argument("--mixed", action="store_true", help="add rows with only one side tuned (an upgrade)")
    args = parser.parse_args()
    total = args.mb * 2**20
    rows = [
        Row("asyncio TCP", "tcp", 1, 16 * total),
        Row("aiortc raw channel", "raw", 1, total),
        Row("aiortc untuned", "link", 1, total),
        Row(f"aiortc untuned, Link x{args.links}", "link", args.links, total),
        Row("aiortc tuned (uvloop + SCTP)", "link", 1, total, sender_tuned=True, receiver_tuned=True),
    ]
    direct_missing = _links.unavailable("direct-tls")
    if direct_missing is None:
        # As the network process runs it (tuning.run: uvloop where installed), and on asyncio's own loop.
        rows.append(Row("raw mutual-TLS socket", "tls", 1, 16 * total, sender_tuned=True, receiver_tuned=True))
        rows.append(Row("direct TLS link", "direct", 1, 16 * total, sender_tuned=True, receiver_tuned=True))
        rows.append(Row("direct TLS link, asyncio loop", "direct", 1, 16 * total))
    if args.mixed:
        rows += [
            Row("tuned sender, untuned recv", "link", 1, total, sender_tuned=True),
            Row("untuned sender, tuned recv", "link", 1, total, receiver_tuned=True),
        ]
    if not apply_sctp_tuning():
        print("SCTP tuning is off here (see the warning above): the tuned rows run untuned")
    remove_sctp_tuning()
    # Interleaved rounds, so a burst of load from elsewhere on the machine hits every row alike.
    rounds = [[measure(row) for row in rows] for _ in range(args.repeat)]
    results = [sorted(column, key=lambda r: r.mb_per_s)[len(column) // 2] for column in zip(*rounds, strict=True)]
    tcp, raw, untuned, tuned = results[0], results[1], results[2], results[4]
    print(
        f"\nloopback, two processes, {os.cpu_count()} cores, median of {args.repeat} interleaved rounds; "
        f"aiortc rows move {args.mb} MiB, TCP {16 * args.mb} MiB; Link rows use hivewire Links"
    )
    header = f"{'path':<30} {'MB/s':>9} {'send CPU%':>10} {'recv CPU%':>10} {'vs TCP':>8} {'vs raw aiortc':>14}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<30} {r.mb_per_s:>9.1f} {r.cpu_percent(r.sender_cpu_s):>10.0f} "
            f"{r.cpu_percent(r.receiver_cpu_s):>10.0f} {r.mb_per_s / tcp.mb_per_s:>8.3f} "
            f"{r.mb_per_s / raw.mb_per_s:>14.2f}"
        )
    if direct_missing is not None:
        print(f"{'direct TLS link':<30} {direct_missing}")
    per_mb = {
        r.name: [1000 * cpu / (r.total_bytes / 1e6) for cpu in (r.sender_cpu_s, r.receiver_cpu_s)] for r in results
    }
    print(
        f"\ntuned / untuned aiortc: {tuned.mb_per_s / untuned.mb_per_s:.2f}x (target >= 2.5x); CPU per MB sent "
        f"{per_mb[tuned.name][0]:.0f} vs {per_mb[untuned.name][0]:.0f} ms, received {per_mb[tuned.name][1]:.0f} vs "
        f"{per_mb[untuned.name][1]:.0f} ms (less sensitive to load than wall time)"
    )
    by_name = {r.name: r for r in results}
    tls = by_name.get("raw mutual-TLS socket")
    for name in ("direct TLS link", "direct TLS link, asyncio loop"):
        r = by_name.get(name)
        if r is None or tls is None:
            continue
        send_ms, recv_ms = per_mb[name]
        print(
            f"{name}: {r.mb_per_s:.0f} MB/s{' (target >= 500)' if name == 'direct TLS link' else ''}, "
            f"{r.mb_per_s / tuned.mb_per_s:.1f}x tuned aiortc, {r.mb_per_s / tcp.mb_per_s:.2f}x plain TCP, "
            f"{r.mb_per_s / tls.mb_per_s:.2f}x a raw mutual-TLS socket; CPU per MB {send_ms:.2f} ms sent, "
            f"{recv_ms:.2f} ms received (raw TLS socket {per_mb[tls.name][0]:.2f} / {per_mb[tls.name][1]:.2f})"
        )
    link = untuned
    print(f"\nthroughput of one Link against raw aiortc: {100 * link.mb_per_s / raw.mb_per_s:.0f}% (target > 90%)")
    sample = os.urandom(64 * 2**20)
    encode_ms, decode_ms = framing_cpu_ms_per_mb(sample)
    raw_send_ms, raw_recv_ms = (1000 * cpu / (raw.total_bytes / 1e6) for cpu in (raw.sender_cpu_s, raw.receiver_cpu_s))
    print(
        f"CPU per MB: framing alone {encode_ms:.1f} ms to send, {decode_ms:.1f} ms to receive; raw aiortc "
        f"{raw_send_ms:.0f} ms to send, {raw_recv_ms:.0f} ms to receive -> framing adds "
        f"{100 * encode_ms / raw_send_ms:.1f}% / {100 * decode_ms / raw_recv_ms:.1f}% CPU (target < 10%)"
    )
    speeds = ", ".join(f"{name} {hash_speed(name, sample):.0f} MB/s" for name in ("sha256", "blake2b"))
    print(f"checksum candidates on this CPU: {speeds} (framing uses sha256)")


if __name__ == "__main__":
    main()
