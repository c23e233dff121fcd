"""The averaging benchmark's plain-TCP baseline transport: one length-prefixed TCP connection per pair of peers.

No TLS, no framing checksum, no credit: the least a GroupTransport can do over TCP, so the rows over the
project's Links (bench/_links.py) show what the real paths cost on top of it.
"""

import asyncio
from multiprocessing.synchronize import Barrier

from hivewire.averaging import PeerUnreachable

MAX_MESSAGE_BYTES = 2**30  # the largest message a benchmark peer accepts
SETUP_TIMEOUT_S = 60.0


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
    """A GroupTransport over one TCP connection per pair of peers."""

    def __init__(self, expected: int) -> None:
        self.streams: dict[str, _Stream] = {}
        self.expected = expected
        self.connected = asyncio.Event()
        self.server: asyncio.Server | None = None
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
        if self.server is not None:
            self.server.close()


async def connect_tcp_group(rank: int, endpoints: list[tuple[str, int]], barrier: Barrier) -> TcpGroupTransport:
    """Every rank listens on its endpoint, waits until all do, and dials the ranks below it (saying who it is)."""
    loop = asyncio.get_running_loop()
    group = TcpGroupTransport(expected=len(endpoints) - 1)
    host, port = endpoints[rank]
    group.server = await loop.create_server(lambda: _Stream(group), host, port)
    await asyncio.to_thread(barrier.wait)
    for other in range(rank):
        _, stream = await loop.create_connection(lambda: _Stream(group), *endpoints[other])
        stream.peer = f"peer{other}"
        group.add(stream.peer, stream)
        await stream.send(rank.to_bytes(8, "little"))
    await asyncio.wait_for(group.connected.wait(), SETUP_TIMEOUT_S)
    return group
