"""One peer link: an RTCPeerConnection with a control channel and a bulk channel, kept alive and watched.

Both channels are pre-negotiated (fixed stream ids, created on both sides before the offer/answer), so no
in-band channel announcement has to be trusted or waited for. The control channel carries small validated
msgpack records (control.py); the bulk channel carries framed payloads (framing.py).

Memory stays bounded in both directions:

* sending waits while the bulk channel's ``bufferedAmount`` is above ``buffer_high_bytes`` until aiortc
  reports it fell to ``bufferedAmountLowThreshold`` (aiortc's send() never blocks on its own);
* data channels have no receive-side flow control, so the receiver grants credit instead: a sender has at
  most ``max_incoming_payloads`` payloads unreleased, and the receiver sends ``bulk_release`` as the
  consumer takes each one. A peer that ignores the credit is refused by the decoder's limits.

A link that stops hearing from its peer for ``keepalive_timeout_s``, or whose connection fails, is
reported once through ``on_dead`` and closed, so the mesh can replace it.

Given a :class:`DirectEndpoint`, the link also tries the direct TLS path (direct.py) once open, and moves
bulk payloads there while it is up (``path``). Nothing is lost when it drops: the sender keeps each payload
sent over it until the peer releases it and sends the unreleased ones again over the data channel, in
order; the receiver drops what it already has by payload id (still returning credit) and delivers each
payload once, in id order. The sender switches to the direct stream only when no payload sent over the
data channel is unreleased, so the two paths never race.
"""

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection

from hivewire.mesh.control import ControlCodec
from hivewire.mesh.direct import PATH_DIRECT, PATH_WEBRTC, DirectEndpoint, DirectSession, DirectStream
from hivewire.mesh.errors import ControlRecordError, FramingError, LinkError
from hivewire.mesh.framing import (
    FRAMING_VERSION,
    HEADER,
    KIND_CHUNK,
    KIND_START,
    FramingLimits,
    PayloadDecoder,
    encode_payload,
    frame_parts,
    max_message_bytes_from_sdp,
)

logger = logging.getLogger(__name__)

CONTROL_CHANNEL_LABEL = "hivewire-control"  # the tuned SCTP sends its messages ahead of bulk data
CONTROL_CHANNEL_ID = 0
BULK_CHANNEL_ID = 1
# Refusals logged one by one before the log thins out to every 1000th, so a hostile peer cannot flood it.
_LOGGED_REFUSALS = 10
_REASON_CHARS = 300  # of a refusal reason sent back to the peer
_MIN_FRAME_BYTES = 1024  # a peer announcing a smaller a=max-message-size is refused (and not standard)
_RATE_MIN_BYTES = 64 * 2**10  # payloads smaller than this say more about latency than throughput
_EARLY_DIRECT_RECORDS = 4  # a hello and an unreachable are all a peer sends before we are open; spare room
_RATE_SAMPLES = 8  # throughput is measured over this many recent payloads per direction


@dataclass(frozen=True)
class LinkSettings:
    """Per-link timing and memory bounds; both peers should run the same values."""

    open_timeout_s: float = 30.0  # ICE + DTLS + SCTP until both channels are open
    keepalive_interval_s: float = 5.0  # a ping is sent this often
    keepalive_timeout_s: float = 20.0  # silence (no record, no frame) after which the link is dead
    buffer_high_bytes: int = 1 * 2**20  # send_payload() waits while bulk bufferedAmount exceeds this
    buffer_low_bytes: int = 256 * 2**10  # ... until it falls to this (bufferedAmountLowThreshold)
    control_backlog_bytes: int = 1 * 2**20  # control bufferedAmount beyond which send_control() fails
    control_queue_records: int = 1024  # received records waiting for recv_control(); more are dropped
    framing: FramingLimits = field(default_factory=FramingLimits)

    def __post_init__(self) -> None:
        if not 0 < self.keepalive_interval_s < self.keepalive_timeout_s:
            raise ValueError(f"need 0 < keepalive_interval_s < keepalive_timeout_s, got {self}")
        if not 0 <= self.buffer_low_bytes < self.buffer_high_bytes:
            raise ValueError(f"need 0 <= buffer_low_bytes < buffer_high_bytes, got {self}")


@dataclass
class LinkStats:
    """Counters an operator (or `hivewire doctor`) reads to see what a link did and refused."""

    payloads_sent: int = 0
    payloads_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_refused: int = 0
    records_refused: int = 0
    records_dropped: int = 0  # valid records dropped because the consumer fell behind
    payloads_refused_by_peer: int = 0  # our payloads the peer discarded (it says why; logged)
    max_buffered_bytes: int = 0  # highest bulk bufferedAmount seen right after a send
    payloads_sent_direct: int = 0  # of payloads_sent, those that went over the direct TLS stream
    payloads_received_direct: int = 0  # of payloads_received, those that came over it
    payloads_resent: int = 0  # sent again over the data channel after the direct stream dropped
    duplicates_dropped: int = 0  # payloads the peer sent again that we already had
    direct_streams_lost: int = 0  # direct streams that dropped while the link was up


@dataclass
class _Outgoing:
    """A payload sent and not yet released; ``stream`` is the direct stream it went over (None: data channel),
    and ``data`` is kept only then, to send it again if that stream drops."""

    data: bytes | bytearray | memoryview | None
    stream: DirectStream | None


_CLOSED: Any = object()


class Link:
    """A link to one peer over ``pc``; construct it on both sides before the offer/answer exchange."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        *,
        peer: str,
        settings: LinkSettings | None = None,
        codec: ControlCodec | None = None,
        on_dead: Callable[["Link", str], None] | None = None,
        direct: DirectEndpoint | None = None,
    ) -> None:
        self.peer = peer
        self.settings = settings or LinkSettings()
        self.stats = LinkStats()
        self.rtt_s: float | None = None
        self.dead_reason: str | None = None
        self._pc = pc
        self._codec = codec or ControlCodec()
        self._on_dead = on_dead
        self._decoder = self._new_decoder()  # the data channel's; each direct stream gets its own
        self._decoders: set[PayloadDecoder] = {self._decoder}  # those still holding payloads, for the limit
        self._stream_decoders: dict[DirectStream, PayloadDecoder] = {}
        self._endpoint = direct
        self._direct_session: DirectSession | None = None
        self._direct: DirectStream | None = None  # the usable direct stream, if any
        self._early_direct: list[dict[str, Any]] = []  # direct records that came before our session started
        self._control = pc.createDataChannel(CONTROL_CHANNEL_LABEL, negotiated=True, id=CONTROL_CHANNEL_ID)
        self._bulk = pc.createDataChannel("hivewire-bulk", negotiated=True, id=BULK_CHANNEL_ID)
        self._bulk.bufferedAmountLowThreshold = self.settings.buffer_low_bytes
        self._loop = asyncio.get_running_loop()
        self._last_heard = self._loop.time()
        self._records: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._payloads: asyncio.Queue[tuple[int, memoryview]] = asyncio.Queue()
        self._wake_sender = asyncio.Event()  # set on bufferedamountlow, on credit returned, on close
        self._send_lock = asyncio.Lock()
        self._payload_ids = itertools.count(1)
        self._last_payload_id = 0
        self._outgoing: dict[int, _Outgoing] = {}  # sent, not yet released by the peer
        self._released = asyncio.Event()  # set whenever a payload is released, and on close (flush waits on it)
        self._pending: dict[int, PayloadDecoder] = {}  # delivered to our consumer, not yet taken
        self._highest_delivered = 0  # payload ids at or below it are duplicates
        self._recv_started: dict[int, float] = {}
        self._send_rates: collections.deque[tuple[int, float]] = collections.deque(maxlen=_RATE_SAMPLES)
        self._recv_rates: collections.deque[tuple[int, float]] = collections.deque(maxlen=_RATE_SAMPLES)
        self._max_frame_bytes = 0
        self._ping_nonce = 0
        self._ping_sent_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._closed = asyncio.Event()
        self._opened = asyncio.Event()  # set when both channels are open, or on close
        self._control.on("message", self._on_control)
        self._bulk.on("message", self._on_bulk)
        self._bulk.on("bufferedamountlow", self._wake_sender.set)
        for channel in (self._control, self._bulk):
            channel.on("open", self._on_channel_open)
            channel.on("close", lambda name=channel.label: self._fail(f"{name} channel closed by the peer"))
        pc.on("connectionstatechange", self._on_connection_state)

    @property
    def control_channel(self) -> RTCDataChannel:
        """The raw control channel (for tests and diagnostics; use send_control to send)."""
        return self._control

    @property
    def bulk_channel(self) -> RTCDataChannel:
        """The raw bulk channel (for tests and diagnostics; use send_payload to send)."""
        return self._bulk

    @property
    def closed(self) -> bool:
        """True once close() has started; nothing can be sent any more."""
        return self._closing

    @property
    def path(self) -> str:
        """Where new bulk payloads go: ``"direct-tls"`` while a verified direct stream is up, else ``"webrtc"``."""
        return PATH_DIRECT if self._direct is not None else PATH_WEBRTC

    @property
    def direct_state(self) -> str:
        """The direct path's state: ``off`` (not offered here), ``trying``, ``up``, ``unreachable``, ``refused``."""
        return self._direct_session.state if self._direct_session is not None else "off"

    @property
    def direct_stream(self) -> DirectStream | None:
        """The direct stream bulk payloads use now (for tests and diagnostics; use send_payload to send)."""
        return self._direct

    @property
    def direct_refusal(self) -> str | None:
        """Why the peer's direct path was refused (its certificate is not the signed one), or None."""
        return self._direct_session.refusal if self._direct_session is not None else None

    @property
    def send_rate_bytes_per_s(self) -> float | None:
        """Bytes/s of our recent payloads (≥ 64 KiB), first frame queued to last; None before any."""
        return _rate(self._send_rates)

    @property
    def recv_rate_bytes_per_s(self) -> float | None:
        """Bytes/s of the peer's recent payloads (≥ 64 KiB), first frame received to last; None before any."""
        return _rate(self._recv_rates)

    @property
    def throughput_bytes_per_s(self) -> float | None:
        """The link's measured throughput: the better of the two directions' recent rates, None before any."""
        rates = [rate for rate in (self.send_rate_bytes_per_s, self.recv_rate_bytes_per_s) if rate is not None]
        return max(rates) if rates else None

    async def wait_open(self) -> None:
        """Wait until both channels are open, then start the keepalive; LinkError after open_timeout_s."""
        try:
            await asyncio.wait_for(self._opened.wait(), self.settings.open_timeout_s)
        except TimeoutError:
            await self._fail_and_close(f"channels not open after open_timeout_s={self.settings.open_timeout_s}")
        if self._closing:
            raise LinkError(f"link to {self.peer} did not open: {self.dead_reason or 'closed'}")
        if self._max_frame_bytes:
            return  # already open: one keepalive per link
        remote = self._pc.remoteDescription
        max_frame_bytes = min(
            self.settings.framing.max_frame_bytes, max_message_bytes_from_sdp(remote.sdp if remote else "")
        )
        if max_frame_bytes < _MIN_FRAME_BYTES:
            reason = f"peer accepts messages of {max_frame_bytes} bytes, fewer than the {_MIN_FRAME_BYTES} we need"
            await self._fail_and_close(reason)
            raise LinkError(f"link to {self.peer} refused: {reason}")
        self._max_frame_bytes = max_frame_bytes
        self._last_heard = self._loop.time()
        self._spawn(self._keepalive())
        logger.info("link to %s open; bulk frames up to %d bytes", self.peer, self._max_frame_bytes)
        if self._endpoint is not None:
            self._start_direct(self._endpoint)

    def _start_direct(self, endpoint: DirectEndpoint) -> None:
        try:
            session = DirectSession(
                endpoint,
                self._pc,
                peer=self.peer,
                max_frame_bytes=self._max_frame_bytes,
                send_control=self.send_control,
                on_stream=self._direct_up,
                on_frame=self._on_direct_frame,
                on_chunk=self._direct_chunk_target,
                on_chunk_filled=self._direct_chunk_filled,
                on_closed=self._direct_closed,
            )
        except (LinkError, ValueError) as exc:
            logger.warning("no direct TLS path to %s: %s; bulk stays on WebRTC", self.peer, exc)
            return
        self._direct_session = session
        try:
            session.start()
        except LinkError as exc:
            logger.warning("could not offer the direct TLS path to %s: %s", self.peer, exc)
        early, self._early_direct = self._early_direct, []
        for record in early:
            session.on_record(record)

    def send_control(self, record: Mapping[str, Any]) -> None:
        """Validate and send one control record; raise LinkError when closed or the peer stopped reading."""
        data = self._codec.encode(record)
        self._check_open()
        if self._control.bufferedAmount > self.settings.control_backlog_bytes:
            raise LinkError(
                f"{self.peer}: control backlog of {self._control.bufferedAmount} bytes exceeds "
                f"control_backlog_bytes={self.settings.control_backlog_bytes}; the peer is not reading"
            )
        self._control.send(data)

    async def recv_control(self) -> dict[str, Any]:
        """The next validated record from the peer (pings and credit excluded); LinkError once closed."""
        return await self._next(self._records)

    async def control_records(self) -> AsyncIterator[dict[str, Any]]:
        """Iterate over records from the peer until the link closes."""
        with contextlib.suppress(LinkError):
            while True:
                yield await self.recv_control()

    async def send_payload(self, data: bytes | bytearray | memoryview, *, borrow: bool = False) -> int:
        """Send one payload; return its id once every frame is in the channel's or the stream's buffer.

        Waits for receiver credit and for the buffer to drain, so at most ``buffer_high_bytes`` (data
        channel) or ``write_buffer_bytes`` (direct stream) plus one frame are queued. Payloads go out one at
        a time, in id order. Over the direct stream the payload is kept until the peer releases it (the
        stream may drop, and then it goes again over the channel): by reference if it is ``bytes`` or if
        ``borrow`` (the caller promises not to change it meanwhile), else as a copy.
        """
        async with self._send_lock:
            await self._resend_lost()
            while len(self._outgoing) >= self.settings.framing.max_incoming_payloads:
                await self._wait_sender_wake()
                await self._resend_lost()
            self._check_open()
            if not self._max_frame_bytes:
                raise LinkError(f"link to {self.peer}: await wait_open() before sending payloads")
            payload_id = next(self._payload_ids)
            self._last_payload_id = payload_id
            size = memoryview(data).nbytes
            started = self._loop.time()
            stream = self._direct
            if stream is not None and all(entry.stream is not None for entry in self._outgoing.values()):
                kept = data if borrow or isinstance(data, bytes) else bytes(data)
                self._outgoing[payload_id] = _Outgoing(kept, stream)
                try:
                    await stream.send_parts(frame_parts(payload_id, kept, self._max_frame_bytes))
                    self.stats.payloads_sent_direct += 1
                except LinkError as exc:
                    logger.info("payload %d to %s goes again over WebRTC: %s", payload_id, self.peer, exc)
                    await self._resend_lost()
            else:
                self._outgoing[payload_id] = _Outgoing(None, None)
                await self._send_on_channel(payload_id, data)
            self.stats.payloads_sent += 1
            self.stats.bytes_sent += size
            _sample(self._send_rates, size, self._loop.time() - started)
            return payload_id

    async def _send_on_channel(self, payload_id: int, data: bytes | bytearray | memoryview) -> None:
        """Frames of one payload into the bulk channel, waiting while bufferedAmount is high."""
        for frame in encode_payload(payload_id, data, self._max_frame_bytes):
            while self._bulk.bufferedAmount > self.settings.buffer_high_bytes:
                await self._wait_sender_wake()
            self._check_open()
            self._bulk.send(frame)
            self.stats.max_buffered_bytes = max(self.stats.max_buffered_bytes, self._bulk.bufferedAmount)

    async def _resend_lost(self) -> None:
        """Send again, over the data channel and in id order, unreleased payloads whose direct stream dropped.

        Called with the send lock held, before anything new goes out, so the peer still sees id order.
        """
        lost = sorted(pid for pid, entry in self._outgoing.items() if entry.stream is not None and entry.stream.closed)
        for payload_id in lost:
            entry = self._outgoing.get(payload_id)
            if entry is None or entry.data is None:
                continue  # released while we resent the ones before it
            data, entry.data, entry.stream = entry.data, None, None
            self.stats.payloads_resent += 1
            await self._send_on_channel(payload_id, data)
        if lost:
            logger.info("sent %d unreleased payload(s) to %s again over WebRTC", len(lost), self.peer)

    async def flush(self, timeout_s: float) -> bool:
        """Wait until the peer released (consumed or refused) every payload we sent; False on timeout or close.

        For a graceful leave: returns at once when nothing is outstanding.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while self._outgoing and not self._closing:
                    self._released.clear()
                    await self._released.wait()
        except TimeoutError:
            pass
        if self._outgoing:
            logger.info("flush: %d payload(s) to %s still unreleased", len(self._outgoing), self.peer)
        return not self._outgoing

    async def recv_payload(self) -> tuple[int, memoryview]:
        """The next complete, checksum-verified payload as ``(payload_id, data)``; LinkError once closed.

        Taking a payload returns its credit to the sender.
        """
        payload_id, data = await self._next(self._payloads)
        decoder = self._pending.pop(payload_id, None)
        if decoder is not None:
            decoder.release()
            self._prune_decoders()
        if not self._closing:
            try:
                self.send_control({"type": "bulk_release", "payload_id": payload_id})
            except LinkError as exc:  # the payload is already taken: hand it over, the link is failing anyway
                logger.warning("could not return credit for payload %d to %s: %s", payload_id, self.peer, exc)
        return payload_id, data

    async def payloads(self) -> AsyncIterator[tuple[int, memoryview]]:
        """Iterate over verified payloads until the link closes."""
        with contextlib.suppress(LinkError):
            while True:
                yield await self.recv_payload()

    async def wait_closed(self) -> None:
        """Return once the link is closed (by us, by the peer, or found dead)."""
        await self._closed.wait()

    async def close(self) -> None:
        """Stop the keepalive, wake every waiter with LinkError, drop partial payloads, close the connection."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        current = asyncio.current_task()
        others = [task for task in self._tasks if task is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self._direct_session is not None:
            await self._direct_session.close()
        dropped = sum(decoder.discard_all() for decoder in self._decoders)
        if dropped:
            logger.info("link to %s closed with %d partial payload(s) dropped", self.peer, dropped)
        self._wake_sender.set()
        self._released.set()
        self._opened.set()
        self._records.put_nowait(_CLOSED)
        self._payloads.put_nowait(_CLOSED)
        await self._pc.close()
        self._closed.set()

    async def _next(self, queue: "asyncio.Queue[Any]") -> Any:
        """Take from a receive queue; the close sentinel stays in it so every later call fails too."""
        item = await queue.get()
        if item is _CLOSED:
            queue.put_nowait(_CLOSED)
            raise LinkError(f"link to {self.peer} is closed: {self.dead_reason or 'closed locally'}")
        return item

    async def _wait_sender_wake(self) -> None:
        self._wake_sender.clear()
        await self._wake_sender.wait()
        self._check_open()

    def _check_open(self) -> None:
        if self._closing:
            raise LinkError(f"link to {self.peer} is closed: {self.dead_reason or 'closed locally'}")
        if self._bulk.readyState != "open" or self._control.readyState != "open":
            raise LinkError(f"link to {self.peer} is not open yet; await wait_open() first")

    def _on_channel_open(self) -> None:
        if self._control.readyState == "open" and self._bulk.readyState == "open":
            self._opened.set()

    def _on_control(self, message: bytes | str) -> None:
        self._last_heard = self._loop.time()
        try:
            record = self._codec.decode(message)
        except ControlRecordError as exc:
            self.stats.records_refused += 1
            self._log_refusal(self.stats.records_refused, "control record", exc)
            return
        kind = record["type"]
        if kind == "ping":
            with contextlib.suppress(LinkError):
                self.send_control({"type": "pong", "nonce": record["nonce"]})
        elif kind == "pong":
            if record["nonce"] == self._ping_nonce:
                self.rtt_s = self._loop.time() - self._ping_sent_at
        elif kind in ("bulk_release", "bulk_refused"):
            self._on_release(record)
        elif kind in ("direct_hello", "direct_unreachable"):
            if self._direct_session is not None:
                self._direct_session.on_record(record)
            elif self._endpoint is not None and len(self._early_direct) < _EARLY_DIRECT_RECORDS:
                self._early_direct.append(record)  # the peer's side opened first; replayed once ours starts
        elif self._records.qsize() >= self.settings.control_queue_records:
            self.stats.records_dropped += 1
            self._log_refusal(self.stats.records_dropped, "control record", "consumer behind, queue full")
        else:
            self._records.put_nowait(record)

    def _on_release(self, record: Mapping[str, Any]) -> None:
        """The peer consumed or refused one of our payloads: its credit comes back."""
        payload_id = record["payload_id"]
        if self._outgoing.pop(payload_id, None) is None:
            if payload_id <= self._last_payload_id:
                # We sent it again after the stream dropped, before its release reached us: released twice.
                logger.debug("%s released payload %d again (it was sent twice)", self.peer, payload_id)
                return
            self.stats.records_refused += 1
            self._log_refusal(self.stats.records_refused, record["type"], f"payload {payload_id} not outstanding")
            return
        self._wake_sender.set()
        self._released.set()
        if record["type"] == "bulk_refused":
            self.stats.payloads_refused_by_peer += 1
            logger.warning("%s refused our payload %d: %r", self.peer, payload_id, record["reason"][:_REASON_CHARS])

    def _on_bulk(self, message: bytes | str) -> None:
        self._last_heard = self._loop.time()
        self._intake(message, self._decoder)  # type: ignore[arg-type]  # str is refused by the decoder

    def _on_direct_frame(self, stream: DirectStream, frame: bytes) -> None:
        self._last_heard = self._loop.time()
        decoder = self._stream_decoders.get(stream)
        if decoder is not None and not self._closing:
            self._intake(frame, decoder)

    def _direct_chunk_target(self, stream: DirectStream, payload_id: int, offset: int, size: int) -> memoryview | None:
        """Where a CHUNK on the direct stream goes: into its payload's buffer when the decoder expects exactly
        this chunk, else None and the whole frame comes through _on_direct_frame (duplicates, refusals)."""
        self._last_heard = self._loop.time()
        decoder = self._stream_decoders.get(stream)
        if decoder is None or self._closing or payload_id <= self._highest_delivered:
            return None
        return decoder.chunk_target(payload_id, offset, size)

    def _direct_chunk_filled(self, stream: DirectStream, payload_id: int, offset: int, body: memoryview) -> None:
        self._last_heard = self._loop.time()
        decoder = self._stream_decoders.get(stream)
        if decoder is None or self._closing:
            return
        try:
            done = decoder.chunk_filled(payload_id, offset, body)
        except FramingError as exc:
            self._refused_frame(exc)
            return
        if done is not None:
            self._deliver(decoder, done)

    def _intake(self, frame: bytes, decoder: PayloadDecoder) -> None:
        """One frame from either path: duplicates dropped by id, the rest decoded, complete payloads queued."""
        if isinstance(frame, bytes) and len(frame) >= HEADER.size:
            version, kind, reserved, payload_id, _ = HEADER.unpack_from(frame)
            if version == FRAMING_VERSION and reserved == 0 and kind in (KIND_START, KIND_CHUNK):
                if payload_id <= self._highest_delivered:
                    if kind == KIND_START:
                        self._drop_duplicate(payload_id)
                    return
                if kind == KIND_START:
                    # The sender starts a payload again on another path only after it gave up on the first:
                    # a partial copy left there would hold a slot that the new copy needs, and the later
                    # payloads still buffered on that path must not complete ahead of this one.
                    for other in list(self._decoders):
                        if other is not decoder and other.discard(payload_id):
                            logger.info("%s restarted payload %d on another path", self.peer, payload_id)
                            self._abandon_stream_of(other, payload_id)
                    if len(self._recv_started) >= 4 * self.settings.framing.max_incoming_payloads:
                        self._recv_started.clear()  # entries of refused payloads; never more than a few
                    self._recv_started[payload_id] = self._loop.time()
        try:
            done = decoder.feed(frame)
        except FramingError as exc:
            self._refused_frame(exc)
            return
        if done is not None:
            self._deliver(decoder, done)

    def _abandon_stream_of(self, decoder: PayloadDecoder, payload_id: int) -> None:
        """Stop reading the direct stream ``decoder`` belongs to: its sender gave it up (restarted
        ``payload_id`` elsewhere), so what it still delivers would overtake the payloads sent again."""
        for stream, owned in list(self._stream_decoders.items()):
            if owned is decoder:
                stream.abort(f"the peer restarted payload {payload_id} over WebRTC")

    def _refused_frame(self, exc: FramingError) -> None:
        self.stats.frames_refused += 1
        self._log_refusal(self.stats.frames_refused, "bulk frame", exc)
        if exc.payload_id is not None and not self._closing:
            # The sender holds credit for this payload until told; the reason is ours, not the peer's text.
            with contextlib.suppress(LinkError):
                self.send_control(
                    {"type": "bulk_refused", "payload_id": exc.payload_id, "reason": str(exc)[:_REASON_CHARS]}
                )

    def _deliver(self, decoder: PayloadDecoder, done: tuple[int, memoryview]) -> None:
        """A complete, verified payload: queue it for the consumer, once, in id order."""
        payload_id, data = done
        if payload_id <= self._highest_delivered:  # it completed on the other path first
            decoder.release()
            self._drop_duplicate(payload_id)
            return
        self._highest_delivered = payload_id
        self._pending[payload_id] = decoder
        self.stats.payloads_received += 1
        self.stats.bytes_received += len(data)
        if decoder is not self._decoder:
            self.stats.payloads_received_direct += 1
        started = self._recv_started.pop(payload_id, None)
        if started is not None:
            _sample(self._recv_rates, len(data), self._loop.time() - started)
        self._payloads.put_nowait(done)

    def _drop_duplicate(self, payload_id: int) -> None:
        """A payload we already have came again; if our consumer took it already, the sender's credit
        may still be waiting for a release it sent before our first one arrived: release it again."""
        self.stats.duplicates_dropped += 1
        if payload_id not in self._pending and not self._closing:
            with contextlib.suppress(LinkError):
                self.send_control({"type": "bulk_release", "payload_id": payload_id})

    def _new_decoder(self) -> PayloadDecoder:
        decoder: PayloadDecoder | None = None

        def held_elsewhere() -> int:
            return sum(other.held for other in self._decoders if other is not decoder)

        decoder = PayloadDecoder(self.settings.framing, peer=self.peer, held_elsewhere=held_elsewhere)
        return decoder

    def _prune_decoders(self) -> None:
        """Forget decoders of dropped streams once they hold nothing."""
        live = {self._decoder, *self._stream_decoders.values()}
        self._decoders = {decoder for decoder in self._decoders if decoder in live or decoder.held}

    def _direct_up(self, stream: DirectStream) -> None:
        if self._closing:
            return
        decoder = self._new_decoder()
        self._stream_decoders[stream] = decoder
        self._decoders.add(decoder)
        self._direct = stream
        self._wake_sender.set()

    def _direct_closed(self, stream: DirectStream, reason: str) -> None:
        """The direct stream ended: partial payloads on it are dropped, unreleased ones go again over WebRTC."""
        if self._direct is stream:
            self._direct = None
        decoder = self._stream_decoders.pop(stream, None)
        if decoder is not None:
            decoder.discard_all()
            self._prune_decoders()
        if self._closing:
            return
        self.stats.direct_streams_lost += 1
        lost = sum(1 for entry in self._outgoing.values() if entry.stream is stream)
        # Quiet when nothing was in flight: a peer closing its link ends the stream just before the channels.
        logger.log(
            logging.WARNING if lost else logging.INFO,
            "direct TLS path to %s dropped (%s); bulk moves to WebRTC, %d unreleased payload(s) go again there",
            self.peer,
            reason,
            lost,
        )
        if lost:
            self._spawn(self._resend_in_background())
        self._wake_sender.set()

    async def _resend_in_background(self) -> None:
        with contextlib.suppress(LinkError):
            async with self._send_lock:
                await self._resend_lost()

    def _log_refusal(self, count: int, what: str, reason: object) -> None:
        if count <= _LOGGED_REFUSALS or count % 1000 == 0:
            logger.warning("refused %s from %s (%d so far): %s", what, self.peer, count, reason)

    async def _keepalive(self) -> None:
        """Ping every keepalive_interval_s; declare the link dead after keepalive_timeout_s of silence."""
        settings = self.settings
        while True:
            await asyncio.sleep(settings.keepalive_interval_s)
            silent_s = self._loop.time() - self._last_heard
            if silent_s > settings.keepalive_timeout_s:
                await self._fail_and_close(
                    f"nothing heard for {silent_s:.1f} s (keepalive_timeout_s={settings.keepalive_timeout_s})"
                )
                return
            self._ping_nonce += 1
            self._ping_sent_at = self._loop.time()
            try:
                self.send_control({"type": "ping", "nonce": self._ping_nonce})
            except LinkError as exc:
                await self._fail_and_close(str(exc))
                return

    def _on_connection_state(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self._fail(f"peer connection {self._pc.connectionState}")

    def _fail(self, reason: str) -> None:
        """Report the link dead once and close it in an owned task (callbacks cannot await)."""
        if self._closing or self.dead_reason is not None:
            return
        self._record_death(reason)
        self._spawn(self.close())

    async def _fail_and_close(self, reason: str) -> None:
        if not self._closing and self.dead_reason is None:
            self._record_death(reason)
        await self.close()

    def _record_death(self, reason: str) -> None:
        self.dead_reason = reason
        logger.warning("link to %s is dead: %s; the mesh should replace it", self.peer, reason)
        if self._on_dead is not None:
            try:
                self._on_dead(self, reason)
            except Exception:
                logger.exception("on_dead callback for the link to %s failed", self.peer)

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro, name=f"hivewire-link-{self.peer}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _sample(samples: "collections.deque[tuple[int, float]]", size: int, seconds: float) -> None:
    if size >= _RATE_MIN_BYTES and seconds > 0:
        samples.append((size, seconds))


def _rate(samples: "collections.deque[tuple[int, float]]") -> float | None:
    seconds = sum(duration for _, duration in samples)
    return sum(size for size, _ in samples) / seconds if seconds > 0 else None
