"""The direct path: bulk payloads over a TCP connection with mutual TLS 1.3, pinned by signed fingerprints.

aiortc's data channel is CPU-bound at tens of MB/s; a TLS stream between the same two processes moves
hundreds (shared/notes/webrtc-field-notes.md). Where two linked peers can reach each other over TCP, bulk
payloads take that stream; the data channel keeps control records and stays the fallback.

Identity is the WebRTC link's own: each side presents, in TLS, the very certificate its peer connection uses
for DTLS, whose fingerprints it signed in its offer or answer (signaling/signed.py). Each side sends that
certificate in a ``direct_hello`` over the already-authenticated control channel; the receiver accepts it
only if its fingerprints are exactly the signed ones of the remote SDP, and then trusts it alone as the root
for the TLS handshake (mutual, TLS 1.3 only), and checks the handshake's certificate against the pinned
fingerprint once more. A peer that presents any other certificate is refused and the link stays on WebRTC.

Who dials: the side with the smaller hello token first; when it cannot connect to any announced address
it says ``direct_unreachable`` and the other side dials back (one of two peers may be behind a NAT). The
listener learns which link a connection is for from a 20-byte plaintext preamble (magic + the token the
listener announced), acknowledged before TLS starts. On the stream each frame of framing.py travels with a
4-byte length, bounded by the framing limits before the frame is read.
"""

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aioice.ice
from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import RTCCertificate
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from hivewire.mesh.control import MAX_DIRECT_ADDRESSES
from hivewire.mesh.errors import LinkError
from hivewire.mesh.framing import FRAMING_VERSION, HEADER, KIND_CHUNK
from hivewire.signaling.signed import fingerprints_from_sdp

logger = logging.getLogger(__name__)

PATH_DIRECT = "direct-tls"
PATH_WEBRTC = "webrtc"
MAGIC = b"HWD1"
TOKEN_BYTES = 16
PREAMBLE = struct.Struct(f"!4s{TOKEN_BYTES}s")
ACK = b"\x01"  # the listener's answer to a preamble it recognised: start TLS now
READY = b"\x02"  # sent by the listener inside TLS once it verified the dialer: the stream is usable
LENGTH = struct.Struct("!I")
MAX_EARLY_BYTES = 2**20  # bytes a stream holds between its TLS handshake and its verification; more: closed
_EARLY_CHUNK_BYTES = 2**12
MAX_PENDING_CONNECTIONS = 64  # incoming connections still in their preamble or handshake; more are reset
_LOGGED_REFUSALS = 10
_HASHES = {"sha-256": hashes.SHA256(), "sha-384": hashes.SHA384(), "sha-512": hashes.SHA512()}


@dataclass(frozen=True)
class DirectSettings:
    """Whether and where to offer the direct TLS path; both peers must enable it for a link to use it."""

    enabled: bool = True  # off: no listener, no hello; links use the data channel for everything
    # Addresses to listen on; None: the addresses ICE gathers host candidates on (mesh/ice.py restriction).
    listen_addresses: tuple[str, ...] | None = None
    port_min: int = 0  # TCP ports to listen on, first free one in port_min..port_max; 0..0: any free port
    port_max: int = 0
    # Extra addresses to announce with the listening port (a public address whose port is forwarded to us).
    advertise_addresses: tuple[str, ...] = ()
    connect_timeout_s: float = 2.0  # per address tried, TCP connect
    handshake_timeout_s: float = 5.0  # preamble, TLS handshake and the READY byte
    write_buffer_bytes: int = 4 * 2**20  # the sender waits while more than this is queued on the socket
    stall_timeout_s: float = 20.0  # a write that makes no progress this long drops the stream (dead network)
    redial_after_s: float = 30.0  # after a direct stream dropped, the first dialer tries again this much later

    def __post_init__(self) -> None:
        if not (0 <= self.port_min <= self.port_max <= 65535):
            raise ValueError(f"need 0 <= port_min <= port_max <= 65535, got {self.port_min}..{self.port_max}")
        if min(self.connect_timeout_s, self.handshake_timeout_s, self.stall_timeout_s, self.write_buffer_bytes) <= 0:
            raise ValueError(f"direct timeouts and buffer must be positive, got {self}")
        for address in (*(self.listen_addresses or ()), *self.advertise_addresses):
            ipaddress.ip_address(address)  # ValueError names a bad literal now, not at the first link


def local_certificate(pc: RTCPeerConnection) -> RTCCertificate:
    """The DTLS certificate of ``pc``, checked to be the one whose fingerprints our local SDP carries.

    aiortc keeps it private; a version that moves it makes this raise LinkError, and the link then simply
    stays on WebRTC, instead of pinning something else.
    """
    certificates = getattr(pc, "_RTCPeerConnection__certificates", None)
    local = pc.localDescription
    if not certificates or local is None:
        raise LinkError("this aiortc keeps no DTLS certificate where direct.py looks for it")
    certificate: RTCCertificate = certificates[0]
    signed = fingerprints_from_sdp(local.sdp)
    if not signed or not matches_fingerprints(certificate._cert, signed):
        raise LinkError("the peer connection's DTLS certificate is not the one our SDP announces")
    return certificate


def matches_fingerprints(cert: x509.Certificate, fingerprints: Iterable[str]) -> bool:
    """True when every fingerprint we can compute ("sha-256 AB:…") is ``cert``'s, and at least one is."""
    checked = 0
    for entry in fingerprints:
        algorithm, _, value = entry.partition(" ")
        if algorithm not in _HASHES:
            continue
        if cert.fingerprint(_HASHES[algorithm]).hex().upper() != value.replace(":", "").upper():
            return False
        checked += 1
    return checked > 0


def _server_context(own: RTCCertificate, peer: x509.Certificate) -> ssl.SSLContext:
    return _context(ssl.PROTOCOL_TLS_SERVER, own, peer)


def _client_context(own: RTCCertificate, peer: x509.Certificate) -> ssl.SSLContext:
    return _context(ssl.PROTOCOL_TLS_CLIENT, own, peer)


def _context(protocol: ssl._SSLMethod, own: RTCCertificate, peer: x509.Certificate) -> ssl.SSLContext:
    """Mutual TLS 1.3 presenting ``own`` and trusting exactly ``peer`` (self-signed: its own root)."""
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # identity is the pinned certificate, not a name
    context.verify_mode = ssl.CERT_REQUIRED
    _load_chain(context, own)
    context.load_verify_locations(cadata=peer.public_bytes(serialization.Encoding.PEM).decode("ascii"))
    return context


def _load_chain(context: ssl.SSLContext, own: RTCCertificate) -> None:
    """ssl loads keys only from files: use an anonymous memory file where there is one, else a private
    temporary directory, removed at once. The key is the link's ephemeral DTLS key, never the peer key."""
    pem = own._key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + own._cert.public_bytes(serialization.Encoding.PEM)
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create("hivewire-direct-key")
        try:
            os.write(fd, pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="hivewire-direct-") as folder:
        path = Path(folder) / "chain.pem"
        path.touch(mode=0o600)
        path.write_bytes(pem)
        context.load_cert_chain(path)


# What a stream's chunk callbacks do: ``on_chunk(stream, payload_id, offset, size)`` returns the view of the
# payload's buffer the chunk's body is read into, or None to get the whole frame through ``on_frame``;
# ``on_chunk_filled(stream, payload_id, offset, view)`` follows once the view holds it.
ChunkTarget = Callable[["DirectStream", int, int, int], memoryview | None]
ChunkFilled = Callable[["DirectStream", int, int, memoryview], None]


class _StreamProtocol(asyncio.BufferedProtocol):
    """The TLS transport's protocol: reads frames into buffers it names (no intermediate copies) and tells
    its stream when the transport may be written to.

    Until the handshake is verified and a stream attached, what arrives is only held, unparsed (at most
    ``MAX_EARLY_BYTES``; more ends the stream on attachment); on the dialing side its first byte must be
    the listener's READY (``ready``). Then each frame is read as its 4-byte length and 20-byte header into
    a small buffer, and its body either straight into the payload's buffer (a CHUNK the decoder expects,
    ``on_chunk``) or into a frame buffer of ``max_frame_bytes``, handed over whole (``on_frame``): START
    frames, and anything unexpected, which the decoder then refuses exactly as on the data channel.
    """

    def __init__(self, *, expect_ready: bool) -> None:
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()  # the READY byte came (dialing side)
        self.ready.add_done_callback(lambda done: done.cancelled() or done.exception())  # awaited or not
        self.lost: asyncio.Future[None] = loop.create_future()  # connection_lost was called
        self.writable = asyncio.Event()
        self.writable.set()
        self._expect_ready = expect_ready
        self._stream: DirectStream | None = None
        # The plain connection's StreamWriter: garbage-collected, it would close the socket under TLS.
        self.plain_writer: asyncio.StreamWriter | None = None
        self._held = bytearray(_EARLY_CHUNK_BYTES)  # what came before attach(), unparsed
        self._held_bytes = 0
        self._held_too_much = False
        self._prefix = bytearray(LENGTH.size + HEADER.size)
        self._frame = bytearray(0)  # sized when a stream is attached
        self._target: memoryview = memoryview(self._held)  # the buffer being filled
        self._filled = 0
        self._state = "early"  # early, prefix, chunk (into a payload) or frame (whole frame buffer)
        self._chunk: tuple[int, int] = (0, 0)  # payload id and offset of the chunk being read
        self._frame_size = 0

    def attach(self, stream: "DirectStream", max_frame_bytes: int) -> None:
        """Start reading frames for ``stream``; what was held is read first, as if it arrived now."""
        self._stream = stream
        self._frame = bytearray(max_frame_bytes)
        self._expect(memoryview(self._prefix), "prefix")
        if self._held_too_much:
            stream.abort(f"more than {MAX_EARLY_BYTES} bytes arrived before the stream was verified")
            return
        held = memoryview(self._held)[int(self._expect_ready) : self._held_bytes]
        self._held = bytearray(0)
        while held and stream.closed_reason is None:
            buffer = self.get_buffer(len(held))
            size = min(len(buffer), len(held))
            buffer[:size] = held[:size]
            held = held[size:]
            self.buffer_updated(size)

    def _expect(self, target: memoryview, state: str) -> None:
        self._target, self._filled, self._state = target, 0, state

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._stream is None:
            if self._held_bytes == len(self._held):
                if len(self._held) >= MAX_EARLY_BYTES:
                    self._held_too_much = True
                    return memoryview(bytearray(_EARLY_CHUNK_BYTES))  # dropped: the stream will not be used
                self._held.extend(bytes(min(len(self._held), MAX_EARLY_BYTES - len(self._held))))
            return memoryview(self._held)[self._held_bytes :]
        return self._target[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        stream = self._stream
        if stream is None:
            if not self._held_too_much:
                self._held_bytes += nbytes
            if self._expect_ready and not self.ready.done() and self._held_bytes:
                if self._held[0] == READY[0]:
                    self.ready.set_result(None)
                else:
                    self.ready.set_exception(ConnectionError("the listener did not confirm the TLS session"))
            return
        self._filled += nbytes
        if self._state == "prefix" and self._filled >= LENGTH.size and not self._length_ok(stream):
            return  # refused as soon as its 4 bytes are in, the header need not follow
        if self._filled < len(self._target) or stream.closed_reason is not None:
            return
        if self._state == "prefix":
            self._prefix_done(stream)
        elif self._state == "chunk":
            target = self._target
            self._expect(memoryview(self._prefix), "prefix")
            payload_id, offset = self._chunk
            stream.frame_done()
            stream.on_chunk_filled(stream, payload_id, offset, target)
        else:
            frame = bytes(memoryview(self._frame)[: self._frame_size])
            self._expect(memoryview(self._prefix), "prefix")
            stream.frame_done()
            stream.on_frame(stream, frame)

    def _length_ok(self, stream: "DirectStream") -> bool:
        (size,) = LENGTH.unpack_from(self._prefix)
        if HEADER.size <= size <= stream.max_frame_bytes:
            return True
        stream.abort(f"refused a frame length of {size} bytes, expected {HEADER.size}..{stream.max_frame_bytes}")
        return False

    def _prefix_done(self, stream: "DirectStream") -> None:
        (size,) = LENGTH.unpack_from(self._prefix)
        version, kind, reserved, payload_id, value = HEADER.unpack_from(self._prefix, LENGTH.size)
        body = size - HEADER.size
        if kind == KIND_CHUNK and version == FRAMING_VERSION and reserved == 0 and body > 0:
            target = stream.on_chunk(stream, payload_id, value, body)
            if target is not None:
                self._chunk = (payload_id, value)
                self._expect(target, "chunk")
                return
        frame = memoryview(self._frame)
        frame[: HEADER.size] = memoryview(self._prefix)[LENGTH.size :]
        self._frame_size = size
        self._expect(frame[HEADER.size : size], "frame")
        if body == 0:
            self.buffer_updated(0)

    def eof_received(self) -> bool | None:
        if self._stream is not None:
            self._stream.abort("the peer closed the stream")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost before READY: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)
        if self._stream is not None:
            if exc is None:
                self._stream.abort("the peer closed the stream")
            else:
                self._stream.abort(f"read failed: {type(exc).__name__}: {exc}")

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class DirectStream:
    """One established, verified TLS stream to a peer: framed writes, and frames read as they arrive.

    ``on_frame`` gets each whole frame (bytes); ``on_chunk`` may instead name where a CHUNK's body goes
    (``on_chunk_filled`` follows), so that bulk bytes are decrypted straight into the payload's buffer;
    ``on_closed`` gets the reason once, whichever side ended it. A length outside
    ``HEADER.size..max_frame_bytes`` cannot be resynchronised: the stream is closed.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: _StreamProtocol,
        *,
        peer: str,
        max_frame_bytes: int,
        write_buffer_bytes: int,
        on_frame: Callable[["DirectStream", bytes], None],
        on_closed: Callable[["DirectStream", str], None],
        stall_timeout_s: float,
        on_chunk: ChunkTarget | None = None,
        on_chunk_filled: ChunkFilled | None = None,
    ) -> None:
        self.peer = peer
        self.closed_reason: str | None = None
        self.frames_received = 0
        self.transport = transport  # the TLS transport (for tests and diagnostics: pause_reading, raw bytes)
        self.max_frame_bytes = max_frame_bytes
        self.on_frame = on_frame
        self.on_chunk: ChunkTarget = on_chunk or (lambda *_: None)
        self.on_chunk_filled: ChunkFilled = on_chunk_filled or (lambda *_: None)
        self._protocol = protocol
        self._on_closed = on_closed
        self._stall_timeout_s = stall_timeout_s
        transport.set_write_buffer_limits(high=write_buffer_bytes)
        protocol.attach(self, max_frame_bytes)

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def frame_done(self) -> None:
        self.frames_received += 1

    async def send_frames(self, frames: Iterable[bytes]) -> None:
        """Write whole frames, each with its length (for tests: any bytes, as a hostile peer would)."""
        await self.send_parts((frame, memoryview(b"")) for frame in frames)

    async def send_parts(self, parts: Iterable[tuple[bytes, memoryview]]) -> None:
        """Write frames given as (head, body) (framing.frame_parts), each with its length, the body from the
        caller's buffer without a copy; wait only while the socket buffer is full; LinkError if it dies.

        The body must not change until the peer released its payload (it may be read again to resend).
        """
        transport = self.transport
        writable = self._protocol.writable
        for head, body in parts:
            if self.closed_reason is not None:
                raise LinkError(f"direct stream to {self.peer} closed: {self.closed_reason}")
            prefix = LENGTH.pack(len(head) + len(body)) + head
            try:
                if body:
                    transport.writelines((prefix, body))
                else:
                    transport.write(prefix)
            except (ConnectionError, OSError, RuntimeError) as exc:
                self.abort(f"write failed: {type(exc).__name__}: {exc}")
                raise LinkError(f"direct stream to {self.peer} closed: {self.closed_reason}") from exc
            if writable.is_set():
                continue
            try:
                async with asyncio.timeout(self._stall_timeout_s):
                    await writable.wait()
            except TimeoutError as exc:
                self.abort(f"no write progress for stall_timeout_s={self._stall_timeout_s}")
                raise LinkError(f"direct stream to {self.peer} closed: {self.closed_reason}") from exc
        if self.closed_reason is not None:
            raise LinkError(f"direct stream to {self.peer} closed: {self.closed_reason}")

    def abort(self, reason: str, *, reset: bool = True) -> None:
        """Close now (nothing more is read) and report ``reason`` once.

        By default with a reset that drops what is queued: after a fault the peer must not take a half-sent
        tail for a clean end, and whatever was queued goes again over the data channel anyway.
        """
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        sock = self.transport.get_extra_info("socket")
        if reset and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()
        self._protocol.writable.set()  # a sender waiting for room sees the close
        self._on_closed(self, reason)

    async def close(self, reason: str = "closed locally") -> None:
        """End the stream without a reset (the link is closing on purpose) and wait until the transport is gone."""
        self.abort(reason, reset=False)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.shield(self._protocol.lost)


class DirectEndpoint:
    """The mesh's TCP listener (one port, on each listen address) and the registry of links expecting a dial."""

    def __init__(self, settings: DirectSettings) -> None:
        self.settings = settings
        self.addresses: list[tuple[str, int]] = []  # what we listen on, as announced in direct_hello
        self._servers: list[asyncio.Server] = []
        self._sessions: dict[bytes, DirectSession] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self.refused = 0  # connections refused before TLS (bad preamble, unknown token)

    async def start(self) -> None:
        """Listen on the configured addresses, or on the ICE host addresses; no address means dial-out only."""
        settings = self.settings
        hosts = settings.listen_addresses
        if hosts is None:
            hosts = tuple(aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True))
        for host in hosts:
            server = await self._listen(host)
            if server is not None:
                self._servers.append(server)
                port = server.sockets[0].getsockname()[1]
                self.addresses.append((host, port))
        if self.addresses:
            port = self.addresses[0][1]
            self.addresses += [(host, port) for host in settings.advertise_addresses]
            self.addresses = list(dict.fromkeys(self.addresses))[:MAX_DIRECT_ADDRESSES]
            logger.info("direct TLS path listening on %s", ", ".join(f"{h}:{p}" for h, p in self.addresses))
        else:
            logger.warning("direct TLS path: no address to listen on (%s); peers may still be dialled", hosts)

    async def _listen(self, host: str) -> asyncio.Server | None:
        settings = self.settings
        ports = range(settings.port_min, settings.port_max + 1)
        for port in ports:
            try:
                return await asyncio.start_server(self._accept, host, port, reuse_address=True)
            except OSError as exc:
                last = exc
        logger.warning("direct TLS path: cannot listen on %s ports %d..%d: %s", host, ports[0], ports[-1], last)
        return None

    def register(self, token: bytes, session: "DirectSession") -> None:
        self._sessions[token] = session

    def unregister(self, token: bytes) -> None:
        self._sessions.pop(token, None)

    async def close(self) -> None:
        """Stop listening and end connections still in their preamble."""
        for server in self._servers:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read the preamble, find the link it names, acknowledge, and hand the connection over."""
        task = asyncio.current_task()
        assert task is not None
        remote = writer.get_extra_info("peername")
        if len(self._handlers) >= MAX_PENDING_CONNECTIONS:
            self._refuse(remote, f"{MAX_PENDING_CONNECTIONS} connections already before TLS")
            writer.transport.abort()
            return
        self._handlers.add(task)
        handed_over = False
        try:
            async with asyncio.timeout(self.settings.handshake_timeout_s):
                magic, token = PREAMBLE.unpack(await reader.readexactly(PREAMBLE.size))
            session = self._sessions.get(token) if magic == MAGIC else None
            if session is None:
                self._refuse(remote, "unknown preamble or token")
                return
            writer.write(ACK)
            handed_over = await session.accept(reader, writer)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._refuse(remote, f"{type(exc).__name__} before TLS")
        finally:
            if not handed_over:
                writer.transport.abort()
            self._handlers.discard(task)

    def _refuse(self, remote: object, reason: str) -> None:
        """Count a refused connection; log the first few, then every 1000th (a scanner cannot flood the log)."""
        self.refused += 1
        if self.refused <= _LOGGED_REFUSALS or self.refused % 1000 == 0:
            logger.warning("direct TLS path: refused connection from %s (%d so far): %s", remote, self.refused, reason)


class DirectSession:
    """One link's side of the direct path: hello, pinning, dialing or accepting, and the resulting stream.

    ``send_control`` sends a control record on the link; ``on_stream`` receives the verified stream (the
    link reads and writes it from then on); ``on_frame``/``on_closed`` are the stream's callbacks.
    """

    def __init__(
        self,
        endpoint: DirectEndpoint,
        pc: RTCPeerConnection,
        *,
        peer: str,
        max_frame_bytes: int,
        send_control: Callable[[Mapping[str, Any]], None],
        on_stream: Callable[[DirectStream], None],
        on_frame: Callable[[DirectStream, bytes], None],
        on_closed: Callable[[DirectStream, str], None],
        on_chunk: ChunkTarget | None = None,
        on_chunk_filled: ChunkFilled | None = None,
    ) -> None:
        self.peer = peer
        self.streams = 0  # direct streams this link has had (a redial after a drop counts again)
        self.refusal: str | None = None  # why this peer's direct path was refused (identity), for doctor
        self._endpoint = endpoint
        self._settings = endpoint.settings
        self._max_frame_bytes = max_frame_bytes
        self._send_control = send_control
        self._on_stream = on_stream
        self._on_frame = on_frame
        self._on_chunk = on_chunk
        self._on_chunk_filled = on_chunk_filled
        self._on_closed = on_closed
        self._own = local_certificate(pc)
        remote = pc.remoteDescription
        self._remote_fingerprints = fingerprints_from_sdp(remote.sdp) if remote is not None else []
        self._remote_ips = _candidate_ips(remote.sdp if remote is not None else "")
        self._token = secrets.token_bytes(TOKEN_BYTES)
        self._peer_cert: x509.Certificate | None = None
        self._hello = asyncio.Event()  # set once the peer's hello was accepted
        self._peer_token: bytes | None = None
        self._peer_addresses: list[tuple[str, int]] = []
        self._dialed = False
        self._unreachable = False  # our last dial reached no address
        self._stream: DirectStream | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def state(self) -> str:
        """``up``, ``refused`` (identity mismatch), ``unreachable`` (our dial failed), or ``trying``."""
        if self._stream is not None:
            return "up"
        if self.refusal is not None:
            return "refused"
        return "unreachable" if self._unreachable else "trying"

    def start(self) -> None:
        """Announce our certificate, token and addresses; the peer's hello may already be on its way."""
        self._endpoint.register(self._token, self)
        der = self._own._cert.public_bytes(serialization.Encoding.DER)
        addresses = [[host, port] for host, port in self._endpoint.addresses]
        self._send_control({"type": "direct_hello", "cert": der, "token": self._token.hex(), "addresses": addresses})

    def on_record(self, record: Mapping[str, Any]) -> None:
        """A validated direct_hello or direct_unreachable from the peer."""
        if self._closing:
            return
        if record["type"] == "direct_hello":
            self._on_hello(record)
        elif self._peer_cert is not None and not self._dialed and self._stream is None:
            logger.info("%s cannot reach us directly (tried %d addresses); dialling it", self.peer, record["tried"])
            self._spawn(self._dial(report_failure=False))

    async def close(self) -> None:
        self._closing = True
        self._endpoint.unregister(self._token)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._stream is not None:
            await self._stream.close()

    def _on_hello(self, record: Mapping[str, Any]) -> None:
        if self._peer_cert is not None or self.refusal is not None:
            return  # one hello per link; a second one changes nothing
        try:
            cert = x509.load_der_x509_certificate(record["cert"])
        except ValueError as exc:
            self._refuse(f"its direct_hello certificate is not DER X.509: {exc}")
            return
        if not matches_fingerprints(cert, self._remote_fingerprints):
            self._refuse("its direct_hello certificate does not match the fingerprints it signed for this link")
            return
        self._peer_cert = cert
        self._hello.set()
        self._peer_token = bytes.fromhex(record["token"])
        announced = [(host, port) for host, port in record["addresses"] if self._dialable(host)]
        ports = list(dict.fromkeys(port for _, port in record["addresses"]))
        # The ICE candidates of the verified SDP are where the peer showed up; try them with its TCP port too.
        guesses = [(ip, port) for ip in self._remote_ips if self._dialable(ip) for port in ports[:1]]
        self._peer_addresses = list(dict.fromkeys(announced + guesses))[:MAX_DIRECT_ADDRESSES]
        if self._token < self._peer_token:
            self._spawn(self._dial(report_failure=True))

    def _dialable(self, host: str) -> bool:
        """Unicast only, and loopback only when we listen there too (a test, or one machine): an
        authenticated peer still must not make us connect to our own machine's other services."""
        address = ipaddress.ip_address(host)
        if address.is_unspecified or address.is_multicast or address == ipaddress.ip_address("255.255.255.255"):
            return False
        if address.is_loopback:
            return any(ipaddress.ip_address(own).is_loopback for own, _ in self._endpoint.addresses)
        return True

    def _refuse(self, reason: str) -> None:
        self.refusal = reason
        logger.warning("direct TLS path to %s refused: %s; the link stays on WebRTC", self.peer, reason)

    async def _dial(self, *, report_failure: bool) -> None:
        """Try each address in turn; the first verified stream wins. Say so when none worked."""
        self._dialed = True
        assert self._peer_token is not None
        assert self._peer_cert is not None
        problems = []
        for host, port in self._peer_addresses:
            if self._stream is not None or self._closing or self.refusal is not None:
                return
            try:
                await self._dial_one(host, port)
                return
            except ssl.SSLCertVerificationError as exc:
                self._refuse(f"{host}:{port} presented a certificate other than the signed one: {exc}")
                return
            except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
                problems.append(f"{host}:{port}: {type(exc).__name__}: {exc}"[:200])
        if self._stream is not None or self._closing:
            return
        self._unreachable = True
        logger.info("no direct path to %s (%s); bulk stays on WebRTC", self.peer, "; ".join(problems) or "no address")
        if report_failure:
            with contextlib.suppress(LinkError):
                self._send_control({"type": "direct_unreachable", "tried": len(self._peer_addresses)})

    async def _dial_one(self, host: str, port: int) -> None:
        assert self._peer_token is not None
        assert self._peer_cert is not None
        settings = self._settings
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(settings.connect_timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
        transport: asyncio.BaseTransport = writer.transport
        try:
            async with asyncio.timeout(settings.handshake_timeout_s):
                writer.write(PREAMBLE.pack(MAGIC, self._peer_token))
                if await reader.readexactly(1) != ACK:
                    raise ConnectionError("the listener did not acknowledge the preamble")
                protocol = _StreamProtocol(expect_ready=True)
                protocol.plain_writer = writer
                context = _client_context(self._own, self._peer_cert)
                transport = await loop.start_tls(writer.transport, protocol, context, server_hostname=None)
                # TLS 1.3 finishes on the client before the server checked our certificate: wait for its word.
                await protocol.ready
            self._verify(transport)
        except BaseException:
            transport.abort()
            raise
        transport = cast(asyncio.Transport, transport)  # uvloop's TLS transport is no subclass of it
        self._adopt(transport, protocol, f"dialled {host}:{port}")

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """The listener's connection for this link: TLS as server, verify, READY; True when adopted."""
        if self._stream is not None or self._closing or self.refusal is not None:
            return False
        remote = writer.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._settings.handshake_timeout_s):
                await self._hello.wait()  # the dial may overtake the peer's hello on the control channel
                assert self._peer_cert is not None
                await writer.drain()  # the ACK
                protocol = _StreamProtocol(expect_ready=False)
                protocol.plain_writer = writer
                context = _server_context(self._own, self._peer_cert)
                transport = await loop.start_tls(writer.transport, protocol, context, server_side=True)
        except ssl.SSLCertVerificationError as exc:
            self._refuse(f"a connection from {remote} presented a certificate other than the signed one: {exc}")
            return False
        except (TimeoutError, ConnectionError, OSError, ssl.SSLError) as exc:
            logger.info(
                "direct TLS handshake from %s for %s failed: %s: %s", remote, self.peer, type(exc).__name__, exc
            )
            return False
        transport = cast(asyncio.Transport, transport)  # uvloop's TLS transport is no subclass of it
        try:
            self._verify(transport)
        except ssl.SSLCertVerificationError as exc:
            transport.abort()
            self._refuse(f"a connection from {remote} presented a certificate other than the signed one: {exc}")
            return True  # the TLS transport is ours and aborted; the plain one went with it
        if self._stream is not None or self._closing or transport.is_closing():
            transport.abort()
            return True
        # No await from here to the stream's attachment: the dialer sends frames only after READY.
        transport.write(READY)
        self._adopt(transport, protocol, f"accepted from {remote}")
        return True

    def _verify(self, transport: asyncio.BaseTransport) -> None:
        """The certificate of the finished handshake must be the pinned one (OpenSSL already trusted only it)."""
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None or not matches_fingerprints(x509.load_der_x509_certificate(der), self._remote_fingerprints):
            raise ssl.SSLCertVerificationError(f"{self.peer}: the TLS certificate is not the signed one")

    def _adopt(self, transport: asyncio.Transport, protocol: "_StreamProtocol", how: str) -> None:
        if transport.is_closing() or protocol.lost.done():
            logger.info("direct TLS stream to %s (%s) closed before it was up", self.peer, how)
            return
        stream = DirectStream(
            transport,
            protocol,
            peer=self.peer,
            max_frame_bytes=self._max_frame_bytes,
            write_buffer_bytes=self._settings.write_buffer_bytes,
            stall_timeout_s=self._settings.stall_timeout_s,
            on_frame=self._on_frame,
            on_chunk=self._on_chunk,
            on_chunk_filled=self._on_chunk_filled,
            on_closed=self._stream_closed,
        )
        self._stream = stream
        self._unreachable = False
        self.streams += 1
        logger.info("direct TLS path to %s is up (%s); bulk payloads move there", self.peer, how)
        self._on_stream(stream)

    def _stream_closed(self, stream: DirectStream, reason: str) -> None:
        """Tell the link, then let the first dialer try again after redial_after_s (a drop may be transient)."""
        self._on_closed(stream, reason)
        if self._stream is not stream or self._closing:
            return
        self._stream = None
        self._dialed = False
        if self.refusal is None and self._peer_token is not None and self._token < self._peer_token:
            self._spawn(self._redial())

    async def _redial(self) -> None:
        await asyncio.sleep(self._settings.redial_after_s)
        await self._dial(report_failure=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"hivewire-direct-dial-{self.peer}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: "asyncio.Task[None]") -> None:
        """Forget a finished dial; dials handle their expected failures, anything else is a bug to log."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("direct TLS dial to %s failed unexpectedly", self.peer, exc_info=task.exception())


def _candidate_ips(sdp: str) -> list[str]:
    """The addresses of host and server-reflexive candidates in an SDP (relayed ones are the TURN server's)."""
    found: list[str] = []
    for line in sdp.splitlines():
        parts = line.split()
        if line.startswith("a=candidate:") and len(parts) >= 8 and parts[7] in ("host", "srflx"):
            try:
                found.append(str(ipaddress.ip_address(parts[4])))
            except ValueError:
                continue  # an mDNS name or garbage: nothing to dial
    return list(dict.fromkeys(found))
