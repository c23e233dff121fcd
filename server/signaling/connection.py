"""One peer's signaling WebSocket: reads within the limits, answers or relays each message, writes from an
outbox, and closes exactly once with the code docs/protocol.md gives for the reason."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from hivewire_server.signaling import protocol
from hivewire_server.signaling.admission import PeerIdentity
from hivewire_server.signaling.hub import Hub
from hivewire_server.signaling.limits import (
    CLOSE_TIMEOUT_SECONDS,
    MALFORMED_IN_A_ROW,
    OUTBOX_MESSAGES,
    Limits,
    TokenBucket,
)
from hivewire_server.signaling.protocol import CloseCode

log = logging.getLogger("hivewire.signaling")

MAX_REASON_BYTES = 123  # RFC 6455: a close frame's reason fits in 123 bytes


class Closing(Exception):
    """Ends the connection with this close code; `reason` goes to the peer in the close frame."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Reader:
    """Receives text messages within the size and rate bounds; a frame outside them raises Closing."""

    def __init__(self, websocket: WebSocket, limits: Limits) -> None:
        self._websocket = websocket
        self._limits = limits
        self._bucket = TokenBucket(rate=limits.messages_per_second, capacity=limits.burst)

    async def next(self, *, within_seconds: float) -> str | None:
        """The next text message, or None once the peer has gone; TimeoutError if none came in time."""
        async with asyncio.timeout(max(within_seconds, 0.0)):
            message = await self._websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        text: str | None = message.get("text")
        if text is None:
            raise Closing(CloseCode.PROTOCOL_ERROR, "binary frames are not part of the protocol; send JSON text")
        if (size := self._limits.size_of(text)) is not None:
            limit = self._limits.max_message_bytes
            raise Closing(CloseCode.TOO_BIG, f"message of {size} bytes over the limit of {limit}")
        if not self._bucket.take():
            raise Closing(
                CloseCode.RATE_LIMITED,
                f"over {self._limits.messages_per_second} messages/s (burst {self._limits.burst})",
            )
        return text


async def send_close(websocket: WebSocket, code: CloseCode, reason: str) -> None:
    """Sends the close frame unless the peer is gone already."""
    short = reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore")
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # RuntimeError: starlette's "already closed"
        await websocket.close(code, short)


class PeerConnection:
    """An authenticated peer. Other tasks hand it messages with `deliver`; `close` may come from any task."""

    def __init__(
        self,
        websocket: WebSocket,
        reader: Reader,
        *,
        identity: PeerIdentity,
        hub: Hub,
        limits: Limits,
        touch: Callable[[], Awaitable[None]],
        touch_every_seconds: float,
    ) -> None:
        self.run = identity.run
        self.peer_id = identity.peer_id
        self.user_id = identity.user_id
        self.connection_id = secrets.token_hex(8)
        self.close_code: CloseCode | None = None
        self._websocket = websocket
        self._reader = reader
        self._identity = identity
        self._hub = hub
        self._limits = limits
        self._touch = touch
        self._touch_every = touch_every_seconds
        self._outbox: asyncio.Queue[str] = asyncio.Queue(OUTBOX_MESSAGES)
        self._send_lock = asyncio.Lock()
        self._reading: asyncio.Task[None] | None = None

    def deliver(self, text: str) -> None:
        """Queues a message for the peer; a peer that stopped reading loses messages rather than memory."""
        if self.close_code is not None:
            return
        try:
            self._outbox.put_nowait(text)
        except asyncio.QueueFull:
            log.warning("dropped a message for peer %s of run %s: %d unread", self.peer_id, self.run, OUTBOX_MESSAGES)

    async def close(self, code: CloseCode, reason: str) -> None:
        if self.close_code is not None:
            return
        self.close_code = code
        if self._reading is not None and self._reading is not asyncio.current_task():
            self._reading.cancel()  # nothing the peer sends after this counts, and its departure is immediate
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS), self._send_lock:  # never inside the writer's send
                await send_close(self._websocket, code, reason)
        except TimeoutError:
            log.warning("peer %s of run %s reads too slowly to receive its close frame", self.peer_id, self.run)
        log.info("closed signaling of peer %s in run %s: %d %s", self.peer_id, self.run, code, reason)

    async def serve(self) -> None:
        """Runs until the peer leaves, breaks a rule, or something closes this connection."""
        writer = asyncio.create_task(self._write(), name=f"signaling-writer-{self.peer_id}")
        self._reading = reader = asyncio.create_task(self._read(), name=f"signaling-reader-{self.peer_id}")
        try:
            await asyncio.wait({reader})  # unlike `await reader`, returns when close() cancelled the reader
            error = None if reader.cancelled() else reader.exception()
            if isinstance(error, Closing):
                await self.close(error.code, error.reason)
            elif error is not None:
                raise error
        finally:
            for task in (reader, writer):
                task.cancel()
            # wait, not gather: if this task is being cancelled, the CancelledError it sees stays its own.
            await asyncio.wait({reader, writer})

    async def _write(self) -> None:
        while True:
            text = await self._outbox.get()
            async with self._send_lock:
                if self.close_code is not None:
                    return
                try:
                    await self._websocket.send_text(text)
                except (WebSocketDisconnect, RuntimeError):  # the peer went away; the reader sees it too
                    return

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        valid_until = loop.time() + (self._identity.valid_until - time.time())
        touched = loop.time()
        malformed = 0
        while self.close_code is None:
            deadline = min(loop.time() + self._limits.silence_seconds, valid_until)
            try:
                text = await self._reader.next(within_seconds=deadline - loop.time())
            except TimeoutError:
                if loop.time() >= valid_until:
                    raise Closing(CloseCode.EXPIRED, "the certificate has expired; renew it, then reconnect") from None
                raise Closing(
                    CloseCode.PROTOCOL_ERROR,
                    f"no message for {self._limits.silence_seconds:.0f} s; send a heartbeat every "
                    f"{self._limits.heartbeat_seconds} s",
                ) from None
            if text is None or self.close_code is not None:
                return
            if loop.time() - touched >= self._touch_every:
                touched = loop.time()
                await self._touch()
            try:
                message = protocol.parse(text)
                if isinstance(message, protocol.Auth):
                    raise protocol.InvalidMessage("already authenticated")
            except protocol.InvalidMessage as exc:
                malformed += 1
                if malformed >= MALFORMED_IN_A_ROW:
                    raise Closing(CloseCode.PROTOCOL_ERROR, f"{malformed} malformed messages in a row") from exc
                self.deliver(protocol.encode(protocol.Error(code="invalid_message", detail=str(exc)[:500])))
                continue
            malformed = 0
            await self._handle(message)

    async def _handle(self, message: protocol.Signal | protocol.Heartbeat | protocol.PeersRequest) -> None:
        if isinstance(message, protocol.PeersRequest):
            peers = await self._hub.sample(self.run, exclude=self.peer_id)
            self.deliver(protocol.encode(protocol.InitialPeers(peers=peers)))
        elif isinstance(message, protocol.Signal) and not await self._hub.relay(self, message):
            detail = f"no live peer {message.to} in run {self.run}"
            self.deliver(protocol.encode(protocol.Error(code="unknown_peer", detail=detail, to=message.to)))
