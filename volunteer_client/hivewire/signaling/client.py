"""The signaling transport: one authenticated WebSocket to the run's server, kept up until `close()`.

What it does (docs/protocol.md, "Signaling (WebSocket)"): authenticates with the peer certificate as the
first message, sends heartbeats at the pace the welcome asks, stays under the server's rate limit, and
after a drop reconnects with exponential backoff and jitter, asking the certificate source again on every
attempt (so an expired certificate, close code 4002, is renewed). Close codes that no retry can fix (4001
invalid, 4003 banned, 4004 other run, 4009 replaced) stop it with an error that `recv()` and the senders
raise. Messages are encoded and validated by messages.py; this module only moves text.

Tasks: one supervisor task per client and, per connection, a reader and a heartbeat task in a TaskGroup;
`close()` cancels the supervisor, which takes the others down with it.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from hivewire.errors import AuthenticationFailed, Forbidden, HivewireError
from hivewire.signaling.errors import (
    SignalingBanned,
    SignalingError,
    SignalingProtocolError,
    SignalingRejected,
    SignalingUnavailable,
)
from hivewire.signaling.messages import (
    Auth,
    ClientMessage,
    ErrorMessage,
    Heartbeat,
    InitialPeers,
    PeersRequest,
    Presence,
    Signal,
    SignalKind,
    SignalRequest,
    Welcome,
    decode_server_message,
    encode_client_message,
)
from hivewire.signaling.settings import Backoff, SignalingSettings

__all__ = ["Backoff", "CertificateSource", "Incoming", "SignalingClient", "SignalingSettings"]

logger = logging.getLogger(__name__)

# The certificate to authenticate with; called before every connection attempt, so it may renew.
CertificateSource = Callable[[], str | Awaitable[str]]
# What recv() returns: relayed envelopes, presence, dropped-message notices, and each welcome (after a
# reconnect its peer list is the fresh view, since presence changes during the gap were missed).
Incoming = Signal | Presence | ErrorMessage | Welcome

EXPIRED_CLOSE_CODE = 4002
# Close codes after which reconnecting cannot help, with what they mean for the operator.
FATAL_CLOSE_CODES = {
    4001: "the server does not accept this peer certificate",
    4003: "this account is banned from the run",
    4004: "the certificate is for another run",
    4009: "another connection of the same peer replaced this one (is the client running twice?)",
}
# HTTP answers to the upgrade request that no retry can fix (no such run, not allowed).
FATAL_HTTP_STATUSES = (401, 403, 404)
_STOPPED: Any = object()


class _TokenBucket:
    """Keeps our sending under the server's bucket, which closes the connection when exceeded."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        # Half the server's burst: its bucket may not be full when we connect.
        self._capacity = max(1.0, burst / 2)
        self._tokens = self._capacity
        self._updated = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
            self._updated = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await asyncio.sleep((1 - self._tokens) / self._rate)


@dataclass
class _Connection:
    """The live connection and what belongs to it; `lost` is set once it is gone."""

    ws: ClientConnection
    welcome: Welcome
    bucket: _TokenBucket
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class SignalingClient:
    """An authenticated signaling connection to `url` (`ws://` or `wss://`), reconnecting until closed."""

    def __init__(
        self,
        url: str,
        certificate: CertificateSource,
        *,
        settings: SignalingSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"a signaling URL starts with ws:// or wss://, got {url!r}")
        self.url = url
        self.settings = settings or SignalingSettings()
        self._certificate = certificate
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not a secret)
        self._current: _Connection | None = None
        self._incoming: asyncio.Queue[Incoming] = asyncio.Queue()
        self._peer_waiters: collections.deque[asyncio.Future[list[str] | None]] = collections.deque()
        self._send_lock = asyncio.Lock()
        self._changed = asyncio.Event()  # replaced on every state change; waiters hold the old one
        self._task: asyncio.Task[None] | None = None
        self._failure: SignalingError | None = None
        self._stopped = False
        self._dropped = 0

    @property
    def connected(self) -> bool:
        """True while an authenticated connection is up."""
        return self._current is not None

    @property
    def welcome(self) -> Welcome | None:
        """The welcome of the current connection (our peer id, the peers, the limits); None while away."""
        return self._current.welcome if self._current else None

    async def start(self) -> None:
        """Connect and authenticate; return once welcomed. Raises what stopped it, or SignalingUnavailable
        after `start_timeout_s`; the client is closed then."""
        if self._task is not None:
            raise RuntimeError("SignalingClient.start() was already called")
        self._task = asyncio.create_task(self._run(), name=f"signaling {self.url}")
        try:
            await self._wait_connection(asyncio.get_running_loop().time() + self.settings.start_timeout_s)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection and stop reconnecting; recv() then raises SignalingUnavailable."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
        self._stop(None)

    async def __aenter__(self) -> SignalingClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def recv(self) -> Incoming:
        """The next signal, presence, error or welcome; raises the error that stopped the client."""
        item = await self._incoming.get()
        if item is _STOPPED:
            self._incoming.put_nowait(_STOPPED)  # for the next caller
            raise self._failure or SignalingUnavailable(f"the signaling client for {self.url} is closed")
        return item

    async def send_signal(self, to: str, kind: SignalKind, payload: Any) -> None:
        """Relay `payload` to peer `to` through the server; waits up to `request_timeout_s` for a connection.

        At most once, like any WebSocket message: one written just before a drop is noticed is lost, so the
        link layer retries on its own deadlines.
        """
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        await self._send(SignalRequest(to=to, kind=kind, payload=payload), deadline)

    async def request_peers(self) -> list[str]:
        """A fresh sample of live peers of the run (self excluded), asked again if the connection drops."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        while True:
            answer: asyncio.Future[list[str] | None] = loop.create_future()
            self._peer_waiters.append(answer)
            try:
                await self._send(PeersRequest(), deadline)
                async with asyncio.timeout_at(deadline):
                    peers = await answer
            except TimeoutError as exc:
                raise SignalingUnavailable(
                    f"{self.url} did not answer a peers request within {self.settings.request_timeout_s} s"
                ) from exc
            finally:
                if answer in self._peer_waiters:
                    self._peer_waiters.remove(answer)
            if peers is not None:
                return peers
            if self._stopped:  # None: the connection was lost (retry) or the client stopped (raise)
                raise self._failure or SignalingUnavailable(f"the signaling client for {self.url} is closed")

    # -- sending ---------------------------------------------------------------------------------------

    async def _send(self, message: ClientMessage, deadline: float) -> None:
        text = encode_client_message(message)
        size = len(text.encode("utf-8"))
        while True:
            connection = await self._wait_connection(deadline)
            limit = connection.welcome.limits.max_message_bytes
            if size > limit:
                raise SignalingProtocolError(
                    f"a {message.type} message of {size} bytes exceeds the server's max_message_bytes={limit}"
                )
            try:
                await self._send_on(connection, text)
                return
            except ConnectionClosed:
                # The supervisor notices too and reconnects; try again on the next connection.
                try:
                    async with asyncio.timeout_at(deadline):
                        await connection.lost.wait()
                except TimeoutError as exc:
                    raise SignalingUnavailable(f"the connection to {self.url} closed while sending") from exc

    async def _send_on(self, connection: _Connection, text: str) -> None:
        async with self._send_lock:
            await connection.bucket.take()
            await connection.ws.send(text)

    async def _wait_connection(self, deadline: float) -> _Connection:
        while True:
            if self._stopped:
                raise self._failure or SignalingUnavailable(f"the signaling client for {self.url} is closed")
            if self._current is not None:
                return self._current
            changed = self._changed
            try:
                async with asyncio.timeout_at(deadline):
                    await changed.wait()
            except TimeoutError as exc:
                raise SignalingUnavailable(
                    f"no authenticated connection to {self.url} in time (see the warnings above for why)"
                ) from exc

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- the connection loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, serve, and reconnect after each loss until closed or refused for good."""
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                welcomed, code, reason = await self._connection()
            except SignalingRejected as exc:
                self._refused(exc)
                return
            except (OSError, TimeoutError, InvalidHandshake, SignalingProtocolError, HivewireError) as exc:
                welcomed, code, reason = False, None, str(exc) or type(exc).__name__
                if isinstance(exc, InvalidStatus) and exc.response.status_code in FATAL_HTTP_STATUSES:
                    self._refused(
                        SignalingRejected(f"{self.url} refused the WebSocket upgrade: {exc}", close_code=None)
                    )
                    return
            except Exception as exc:
                logger.exception("signaling client for %s stopped on an unexpected error", self.url)
                self._refused(SignalingError(f"signaling to {self.url} stopped: {exc!r}"))
                return
            if code in FATAL_CLOSE_CODES:
                kind = SignalingBanned if code == 4003 else SignalingRejected
                self._refused(
                    kind(f"{self.url} closed the connection: {FATAL_CLOSE_CODES[code]}", close_code=code, reason=reason)
                )
                return
            stable = welcomed and loop.time() - started >= self.settings.stable_after_s
            failures = 1 if stable else failures + 1
            delay = self.settings.backoff.delay_s(failures, self._rng)
            if code == EXPIRED_CLOSE_CODE:
                logger.info("signaling: the certificate expired (4002); renewing it, reconnecting in %.1f s", delay)
            elif welcomed:
                logger.warning(
                    "signaling: lost %s (close code %s %s); reconnecting in %.1f s", self.url, code, reason, delay
                )
            else:
                problem = f"close code {code} {reason}" if code else reason
                logger.warning("signaling: cannot connect to %s (%s); retrying in %.1f s", self.url, problem, delay)
            await asyncio.sleep(delay)

    async def _connection(self) -> tuple[bool, int | None, str]:
        """One connection from upgrade to close: (whether it was welcomed, close code, close reason)."""
        token = await self._fresh_certificate()
        ws = await connect(
            self.url,
            open_timeout=self.settings.open_timeout_s,
            close_timeout=self.settings.close_timeout_s,
            ping_interval=self.settings.ping_interval_s,
            ping_timeout=self.settings.ping_timeout_s,
            max_size=self.settings.max_incoming_bytes,
            compression=None,
            user_agent_header="hivewire-client",
        )
        welcome: Welcome | None = None
        try:
            try:
                welcome = await self._authenticate(ws, token)
                await self._serve(ws, welcome)
            except ConnectionClosed:
                pass
            return welcome is not None, ws.close_code, ws.close_reason or ""
        finally:
            await ws.close()

    async def _fresh_certificate(self) -> str:
        try:
            token = self._certificate()
            if inspect.isawaitable(token):
                token = await token
        except (AuthenticationFailed, Forbidden) as exc:
            raise SignalingRejected(
                f"cannot get a peer certificate for {self.url}: {exc}", close_code=None, advice=exc.advice
            ) from exc
        if not isinstance(token, str):
            raise TypeError(f"the certificate source returned {type(token).__name__}, not a str")
        return token

    async def _authenticate(self, ws: ClientConnection, token: str) -> Welcome:
        await ws.send(encode_client_message(Auth(certificate=token)))
        async with asyncio.timeout(self.settings.auth_timeout_s):
            data = await ws.recv()
        message = decode_server_message(data, max_bytes=self.settings.max_incoming_bytes)
        if not isinstance(message, Welcome):
            raise SignalingProtocolError(f"expected a welcome after authenticating, got {message.type!r}")
        return message

    async def _serve(self, ws: ClientConnection, welcome: Welcome) -> None:
        limits = welcome.limits
        connection = _Connection(
            ws, welcome, _TokenBucket(limits.messages_per_second * self.settings.rate_share, limits.burst)
        )
        self._current = connection
        self._notify()
        logger.info(
            "signaling: connected to %s as %s; %d peers online; heartbeat every %.1f s",
            self.url,
            welcome.peer_id,
            len(welcome.peers),
            welcome.heartbeat_seconds * self.settings.heartbeat_share,
        )
        self._deliver(welcome)
        try:
            async with asyncio.TaskGroup() as tasks:
                heartbeats = tasks.create_task(self._heartbeats(connection), name=f"signaling heartbeats {self.url}")
                await self._read(ws)
                heartbeats.cancel()
        finally:
            self._current = None
            connection.lost.set()
            self._release_peer_waiters()
            self._notify()

    async def _heartbeats(self, connection: _Connection) -> None:
        interval_s = connection.welcome.heartbeat_seconds * self.settings.heartbeat_share
        text = encode_client_message(Heartbeat())
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self._send_on(connection, text)
        except ConnectionClosed:
            return  # the reader sees the close too and ends the connection

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for data in ws:
                try:
                    message = decode_server_message(data, max_bytes=self.settings.max_incoming_bytes)
                except SignalingProtocolError as exc:
                    logger.warning("signaling: dropped a message from %s: %s", self.url, exc)
                    continue
                if isinstance(message, InitialPeers):
                    self._answer_peers(message.peers)
                elif isinstance(message, Welcome):
                    logger.warning("signaling: dropped a second welcome from %s", self.url)
                else:
                    self._deliver(message)
        except ConnectionClosed:
            return

    # -- delivery and state ----------------------------------------------------------------------------

    def _deliver(self, message: Incoming) -> None:
        if self._incoming.qsize() >= self.settings.incoming_queue:
            self._dropped += 1
            logger.warning(
                "signaling: %d messages wait for recv(); dropped a %s (%d dropped so far): the consumer is behind",
                self._incoming.qsize(),
                message.type,
                self._dropped,
            )
            return
        self._incoming.put_nowait(message)

    def _answer_peers(self, peers: list[str]) -> None:
        while self._peer_waiters:
            waiter = self._peer_waiters.popleft()
            if not waiter.done():
                waiter.set_result(peers)
                return
        logger.debug("signaling: an initial_peers answer nobody waits for (a request timed out)")

    def _release_peer_waiters(self) -> None:
        """Wake everyone waiting for a peers answer with None: ask again, or raise if stopped."""
        while self._peer_waiters:
            waiter = self._peer_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _refused(self, error: SignalingError) -> None:
        logger.error("signaling: stopped: %s. %s", error, error.advice)
        self._stop(error)

    def _stop(self, failure: SignalingError | None) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._failure = failure
        self._incoming.put_nowait(_STOPPED)
        self._release_peer_waiters()
        self._notify()
