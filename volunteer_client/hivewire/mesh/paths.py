"""Signaling paths: the ways an offer, answer or bye reaches another peer of the run.

The mesh does not care how a signal travels, only that the sender of what it receives is named by the
path (the server fills ``from``; a relaying neighbour fills it from its link) and that offers and answers
are signed end to end, so any path may be hostile. Two implementations: :class:`ServerPath` over the
server's signaling WebSocket and :class:`hivewire.mesh.relay.RelayPath` through a neighbour's control
channel, used while the server is unreachable.
"""

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from hivewire.mesh.errors import MeshError
from hivewire.signaling import SignalingClient, SignalingError, messages
from hivewire.signaling.client import Incoming

logger = logging.getLogger(__name__)


class NoSignalingPath(MeshError):
    """No path can carry a signal to the peer now (server down and no neighbour links to it)."""


@dataclass(frozen=True)
class Signal:
    """One signal received: who sent it (as the path vouches), what kind, its payload, and the path's name."""

    sender: str
    kind: str
    payload: Mapping[str, Any]
    via: str  # "server" or the peer id of the relaying neighbour: answers go back the same way first


class SignalingPath(Protocol):
    """Carries signals to other peers; raises NoSignalingPath when it cannot reach ``to`` now."""

    name: str

    async def send_signal(self, to: str, kind: str, payload: Mapping[str, Any]) -> None: ...


class SignalSink(Protocol):
    """What a path delivers to (the mesh): signals, presence changes and samples of live peers."""

    def on_signal(self, signal: Signal) -> None: ...

    def on_presence(self, peer: str, joined: bool) -> None: ...

    def on_peers(self, peers: list[str]) -> None: ...

    def on_undeliverable(self, peer: str, detail: str) -> None: ...


class ServerPath:
    """The server's signaling WebSocket as a path; pumps what the server sends into the sink.

    Owns ``client`` (a SignalingClient): start() starts it, close() closes it. The client reconnects on
    its own; while it is away, send_signal raises NoSignalingPath at once so the mesh relays instead.
    """

    name = "server"

    def __init__(self, client: SignalingClient, sink: SignalSink) -> None:
        self._client = client
        self._sink = sink
        self._pump_task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._client.connected

    async def start(self) -> None:
        """Connect (raises what the client raises when the server refuses us) and start delivering."""
        await self._client.start()
        self._pump_task = asyncio.get_running_loop().create_task(self._pump(), name="hivewire-mesh-server-path")

    async def send_signal(self, to: str, kind: str, payload: Mapping[str, Any]) -> None:
        if not self._client.connected:
            raise NoSignalingPath(f"not connected to {self._client.url}")
        try:
            await self._client.send_signal(to, kind, dict(payload))  # type: ignore[arg-type]  # kind checked
        except SignalingError as exc:
            raise NoSignalingPath(f"server signaling cannot reach {to} now: {exc}") from exc

    async def request_peers(self) -> None:
        """Ask the server for a fresh sample of live peers; skipped while it is unreachable."""
        if not self._client.connected:
            return
        try:
            self._sink.on_peers(await self._client.request_peers())
        except SignalingError as exc:
            logger.info("cannot ask %s for peers now: %s", self._client.url, exc)

    async def close(self) -> None:
        """Stop pumping and close the client."""
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
        await self._client.close()

    async def _pump(self) -> None:
        while True:
            try:
                message = await self._client.recv()
            except SignalingError as exc:
                logger.warning("server signaling stopped: %s; new links form through neighbours only", exc)
                return
            self._dispatch(message)

    def _dispatch(self, message: Incoming) -> None:
        """Hand one message (validated by the client) to the sink."""
        if isinstance(message, messages.Signal):
            if isinstance(message.payload, Mapping):
                self._sink.on_signal(Signal(message.from_, message.kind, message.payload, via=self.name))
            else:
                logger.warning("dropped a %s from %s: its payload is not an object", message.kind, message.from_)
        elif isinstance(message, messages.Presence):
            self._sink.on_presence(message.peer_id, message.state == "joined")
        elif isinstance(message, messages.Welcome):
            self._sink.on_peers(list(message.peers))
        else:
            logger.info("%s dropped one of our signals: %s %s", self._client.url, message.code, message.detail)
            if message.to is not None:
                self._sink.on_undeliverable(message.to, f"{message.code}: {message.detail}")
