"""A GossipTransport over real aiortc Links on loopback, as the mesh manager provides one over its links.

Offer and answer pass directly between the two peer connections (no signaling server), and every SDP is
checked to carry loopback candidates only before the other side applies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Collection, Mapping
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription

from hivewire.coordination import COORDINATION_SCHEMAS, RecordHandler
from hivewire.mesh import ControlCodec, Link, LinkError, build_configuration

LOOPBACK = "127.0.0.1"
_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ", re.MULTILINE)


def _loopback(description: RTCSessionDescription | None) -> RTCSessionDescription:
    assert description is not None
    addresses = set(_CANDIDATE.findall(description.sdp))
    assert addresses == {LOOPBACK}, f"non-loopback candidates in SDP: {addresses}"
    return description


class LinkTransport:
    """One peer's links in a LinkSwarm; records of registered types go to their handlers."""

    def __init__(self, swarm: LinkSwarm, peer_id: str) -> None:
        self._swarm = swarm
        self._peer_id = peer_id
        self.links: dict[str, Link] = {}
        self._handlers: dict[str, RecordHandler] = {}
        self._readers: set[asyncio.Task[None]] = set()

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def neighbours(self) -> list[str]:
        return sorted(peer for peer, link in self.links.items() if not link.closed)

    def send_control(self, peer: str, record: Mapping[str, Any]) -> None:
        link = self.links.get(peer)
        if link is None:
            raise LinkError(f"no link from {self._peer_id} to {peer}")
        link.send_control(record)

    def on_records(self, types: Collection[str], handler: RecordHandler) -> None:
        for kind in types:
            self._handlers[kind] = handler

    async def connect(self, peer: str) -> None:
        if peer not in self.links:
            await self._swarm.link(self._peer_id, peer)

    def adopt(self, link: Link) -> None:
        self.links[link.peer] = link
        task = asyncio.get_running_loop().create_task(self._read(link))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _read(self, link: Link) -> None:
        async for record in link.control_records():
            handler = self._handlers.get(record["type"])
            if handler is not None:
                handler(link.peer, record)

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links.values()))
        for task in list(self._readers):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class LinkSwarm:
    """Peers joined by real Links on loopback; a link opens on ``link()`` or a transport's ``connect()``."""

    def __init__(self) -> None:
        self.transports: dict[str, LinkTransport] = {}
        self._pending: dict[frozenset[str], asyncio.Task[None]] = {}

    def join(self, peer_id: str) -> LinkTransport:
        transport = self.transports[peer_id] = LinkTransport(self, peer_id)
        return transport

    async def link(self, a: str, b: str) -> None:
        """Open one link between a and b; a second caller for the same pair waits for the first."""
        key = frozenset((a, b))
        if key not in self._pending:
            self._pending[key] = asyncio.get_running_loop().create_task(self._open(a, b))
        await asyncio.shield(self._pending[key])

    async def _open(self, a: str, b: str) -> None:
        pc_a, pc_b = RTCPeerConnection(build_configuration([])), RTCPeerConnection(build_configuration([]))
        link_a = Link(pc_a, peer=b, codec=ControlCodec(COORDINATION_SCHEMAS))
        link_b = Link(pc_b, peer=a, codec=ControlCodec(COORDINATION_SCHEMAS))
        await pc_a.setLocalDescription(await pc_a.createOffer())
        await pc_b.setRemoteDescription(_loopback(pc_a.localDescription))
        await pc_b.setLocalDescription(await pc_b.createAnswer())
        await pc_a.setRemoteDescription(_loopback(pc_b.localDescription))
        await asyncio.gather(link_a.wait_open(), link_b.wait_open())
        self.transports[a].adopt(link_a)
        self.transports[b].adopt(link_b)

    async def close(self) -> None:
        for task in self._pending.values():
            with contextlib.suppress(Exception):
                await task
        await asyncio.gather(*(transport.close() for transport in self.transports.values()))
