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
"""

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection

from hivewire.mesh.control import ControlCodec
from hivewire.mesh.errors import ControlRecordError, FramingError, LinkError
from hivewire.mesh.framing import FramingLimits, PayloadDecoder, encode_payload, max_message_bytes_from_sdp

logger = logging.getLogger(__name__)

CONTROL_CHANNEL_ID = 0
BULK_CHANNEL_ID = 1
# Refusals logged one by one before the log thins out to every 1000th, so a hostile peer cannot flood it.
_LOGGED_REFUSALS = 10
_REASON_CHARS = 300  # of a refusal reason sent back to the peer
_MIN_FRAME_BYTES = 1024  # a peer announcing a smaller a=max-message-size is refused (and not standard)


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
    ) -> None:
        self.peer = peer
        self.settings = settings or LinkSettings()
        self.stats = LinkStats()
        self.rtt_s: float | None = None
        self.dead_reason: str | None = None
        self._pc = pc
        self._codec = codec or ControlCodec()
        self._on_dead = on_dead
        self._decoder = PayloadDecoder(self.settings.framing, peer=peer)
        self._control = pc.createDataChannel("hivewire-control", negotiated=True, id=CONTROL_CHANNEL_ID)
        self._bulk = pc.createDataChannel("hivewire-bulk", negotiated=True, id=BULK_CHANNEL_ID)
        self._bulk.bufferedAmountLowThreshold = self.settings.buffer_low_bytes
        self._loop = asyncio.get_running_loop()
        self._last_heard = self._loop.time()
        self._records: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._payloads: asyncio.Queue[tuple[int, bytearray]] = asyncio.Queue()
        self._wake_sender = asyncio.Event()  # set on bufferedamountlow, on credit returned, on close
        self._send_lock = asyncio.Lock()
        self._payload_ids = itertools.count(1)
        self._unreleased: set[int] = set()
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

    async def send_payload(self, data: bytes | bytearray | memoryview) -> int:
        """Send one payload; return its id once every frame is in the channel buffer.

        Waits for receiver credit and for ``bufferedAmount`` to drain, so at most ``buffer_high_bytes`` plus
        one frame are queued. Payloads go out one at a time (one ordered stream, nothing to gain by mixing).
        """
        async with self._send_lock:
            while len(self._unreleased) >= self.settings.framing.max_incoming_payloads:
                await self._wait_sender_wake()
            self._check_open()
            if not self._max_frame_bytes:
                raise LinkError(f"link to {self.peer}: await wait_open() before sending payloads")
            payload_id = next(self._payload_ids)
            self._unreleased.add(payload_id)
            for frame in encode_payload(payload_id, data, self._max_frame_bytes):
                while self._bulk.bufferedAmount > self.settings.buffer_high_bytes:
                    await self._wait_sender_wake()
                self._check_open()
                self._bulk.send(frame)
                self.stats.max_buffered_bytes = max(self.stats.max_buffered_bytes, self._bulk.bufferedAmount)
            self.stats.payloads_sent += 1
            self.stats.bytes_sent += memoryview(data).nbytes
            return payload_id

    async def recv_payload(self) -> tuple[int, bytearray]:
        """The next complete, checksum-verified payload as ``(payload_id, data)``; LinkError once closed.

        Taking a payload returns its credit to the sender.
        """
        payload_id, data = await self._next(self._payloads)
        self._decoder.release()
        if not self._closing:
            try:
                self.send_control({"type": "bulk_release", "payload_id": payload_id})
            except LinkError as exc:  # the payload is already taken: hand it over, the link is failing anyway
                logger.warning("could not return credit for payload %d to %s: %s", payload_id, self.peer, exc)
        return payload_id, data

    async def payloads(self) -> AsyncIterator[tuple[int, bytearray]]:
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
        dropped = self._decoder.discard_all()
        if dropped:
            logger.info("link to %s closed with %d partial payload(s) dropped", self.peer, dropped)
        self._wake_sender.set()
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
        elif self._records.qsize() >= self.settings.control_queue_records:
            self.stats.records_dropped += 1
            self._log_refusal(self.stats.records_dropped, "control record", "consumer behind, queue full")
        else:
            self._records.put_nowait(record)

    def _on_release(self, record: Mapping[str, Any]) -> None:
        """The peer consumed or refused one of our payloads: its credit comes back."""
        payload_id = record["payload_id"]
        if payload_id not in self._unreleased:
            self.stats.records_refused += 1
            self._log_refusal(self.stats.records_refused, record["type"], f"payload {payload_id} not outstanding")
            return
        self._unreleased.discard(payload_id)
        self._wake_sender.set()
        if record["type"] == "bulk_refused":
            self.stats.payloads_refused_by_peer += 1
            logger.warning("%s refused our payload %d: %r", self.peer, payload_id, record["reason"][:_REASON_CHARS])

    def _on_bulk(self, message: bytes | str) -> None:
        self._last_heard = self._loop.time()
        try:
            done = self._decoder.feed(message)  # type: ignore[arg-type]  # str is refused inside
        except FramingError as exc:
            self.stats.frames_refused += 1
            self._log_refusal(self.stats.frames_refused, "bulk frame", exc)
            if exc.payload_id is not None and not self._closing:
                # The sender holds credit for this payload until told; the reason is ours, not the peer's text.
                with contextlib.suppress(LinkError):
                    self.send_control(
                        {"type": "bulk_refused", "payload_id": exc.payload_id, "reason": str(exc)[:_REASON_CHARS]}
                    )
            return
        if done is not None:
            self.stats.payloads_received += 1
            self.stats.bytes_received += len(done[1])
            self._payloads.put_nowait(done)

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
