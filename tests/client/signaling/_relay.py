"""A signaling relay on 127.0.0.1 that speaks docs/protocol.md well enough for the client, and misbehaves on cue.

It stands in for a compromised server: `tamper` sees every envelope it relays and may rewrite or replace it,
`refuse` closes chosen certificates with a close code at authentication, and `drop` or `close_peer` end a
peer's connection. It never checks certificates beyond reading the peer id out of them: the client side
(DescriptionVerifier) is what must catch a bad one.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import jwt
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.client.signaling._support import LOOPBACK

Envelope = dict[str, Any]
WELCOME_LIMITS = {"max_message_bytes": 65536, "messages_per_second": 200, "burst": 400}


class Relay:
    def __init__(self, *, heartbeat_seconds: float = 15) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        # Rewrites each relayed envelope (or returns None to drop it); None relays faithfully.
        self.tamper: Callable[[Envelope], Envelope | None] | None = None
        # Certificate → (close code, reason) answered instead of a welcome.
        self.refuse: dict[str, tuple[int, str]] = {}
        self.certificates: list[str] = []  # every certificate presented, in order
        self.relayed: list[Envelope] = []  # every envelope as the sender sent it (after `from` was filled)
        self.heartbeats = 0
        self.peers: dict[str, ServerConnection] = {}
        self._server: Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://{LOOPBACK}:{port}/api/runs/tiny-lm/signal"

    async def start(self) -> None:
        self._server = await serve(self._handle, LOOPBACK, 0, compression=None)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def drop(self, peer_id: str) -> None:
        """End a peer's connection abruptly, as a crashed server or a broken network would."""
        transport = self.peers[peer_id].transport
        transport.abort()

    async def close_peer(self, peer_id: str, code: int, reason: str) -> None:
        await self.peers[peer_id].close(code, reason)

    async def _handle(self, ws: ServerConnection) -> None:
        auth = json.loads(await ws.recv())
        assert auth["type"] == "auth", auth
        certificate = auth["certificate"]
        self.certificates.append(certificate)
        if certificate in self.refuse:
            await ws.close(*self.refuse[certificate])
            return
        peer_id = jwt.decode(certificate, options={"verify_signature": False})["peer_id"]
        others = [other for other in self.peers if other != peer_id]
        self.peers[peer_id] = ws
        welcome = {
            "type": "welcome",
            "peer_id": peer_id,
            "peers": others,
            "heartbeat_seconds": self.heartbeat_seconds,
            "limits": WELCOME_LIMITS,
        }
        await ws.send(json.dumps(welcome))
        await self._broadcast(peer_id, "joined")
        try:
            async for text in ws:
                await self._on_message(peer_id, json.loads(text), ws)
        except ConnectionClosed:
            pass
        finally:
            if self.peers.get(peer_id) is ws:
                del self.peers[peer_id]
                await self._broadcast(peer_id, "left")

    async def _on_message(self, peer_id: str, message: dict[str, Any], ws: ServerConnection) -> None:
        if message["type"] == "heartbeat":
            self.heartbeats += 1
        elif message["type"] == "peers":
            others = [other for other in self.peers if other != peer_id]
            await ws.send(json.dumps({"type": "initial_peers", "peers": others}))
        elif message["type"] == "signal":
            envelope = {"type": "signal", "from": peer_id, **{k: message[k] for k in ("to", "kind", "payload")}}
            self.relayed.append(envelope)
            out = self.tamper(envelope) if self.tamper else envelope
            target = self.peers.get(envelope["to"])
            if target is None:
                error = {"type": "error", "code": "unknown_peer", "detail": "not here", "to": envelope["to"]}
                await ws.send(json.dumps(error))
            elif out is not None:
                await target.send(json.dumps(out))

    async def _broadcast(self, peer_id: str, state: str) -> None:
        for other, connection in list(self.peers.items()):
            if other != peer_id:
                with contextlib.suppress(ConnectionClosed):
                    await connection.send(json.dumps({"type": "presence", "peer_id": peer_id, "state": state}))
