"""Helpers for the coordination tests: volunteers with certificates, an in-process gossip hub, bounded waits.

``GossipHub`` is a whole swarm in one event loop: every record is packed and unpacked by the same
ControlCodec a Link uses (so tuples become lists, bytes stay bytes, junk is refused) and delivered on a
later turn of the loop, only along links the test made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

from hivewire.coordination import COORDINATION_SCHEMAS, RecordHandler
from hivewire.identity import PeerIdentity
from hivewire.mesh import ControlCodec, LinkError

T = TypeVar("T")


@dataclass
class Member:
    """A volunteer of the run: its peer key and a certificate signed for it."""

    identity: PeerIdentity
    certificate: str

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


class Clock:
    """Wall time a test can move forward."""

    def __init__(self, now: float = 1_764_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class HubTransport:
    """One peer's GossipTransport in a GossipHub; ``mute`` drops everything it sends.

    ``mute_after`` mutes it once it sent that many records (it dies mid-way); ``sent`` lists what it sent.
    ``throughputs`` are what ``link(peer).throughput_bytes_per_s`` reports, as a mesh Link measures it.
    """

    hub: GossipHub
    own_id: str
    links: set[str] = field(default_factory=set)
    handlers: dict[str, RecordHandler] = field(default_factory=dict)
    mute: bool = False
    mute_after: int | None = None
    connects: list[str] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    throughputs: dict[str, float] = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return self.own_id

    @property
    def neighbours(self) -> list[str]:
        return sorted(self.links)

    def send_control(self, peer: str, record: Mapping[str, Any]) -> None:
        if peer not in self.links:
            raise LinkError(f"no link from {self.own_id} to {peer}")
        data = self.hub.codec.encode(record)
        self.mute = self.mute or (self.mute_after is not None and len(self.sent) >= self.mute_after)
        self.sent.append(dict(record))
        if not self.mute:
            asyncio.get_running_loop().call_soon(self.hub.peers[peer].deliver, self.own_id, data)

    def on_records(self, types: Collection[str], handler: RecordHandler) -> None:
        for kind in types:
            self.handlers[kind] = handler

    def link(self, peer: str) -> SimpleNamespace | None:
        if peer not in self.links:
            return None
        return SimpleNamespace(throughput_bytes_per_s=self.throughputs.get(peer))  # None: not measured yet

    async def connect(self, peer: str) -> None:
        if peer not in self.hub.peers:
            raise LinkError(f"{peer} is not in the swarm")
        self.connects.append(peer)
        self.hub.link(self.own_id, peer)

    def deliver(self, sender: str, data: bytes) -> None:
        if sender not in self.links:
            return  # the link went away while the record was in flight
        record = self.hub.codec.decode(data)
        handler = self.handlers.get(record["type"])
        if handler is not None:
            handler(sender, record)


class GossipHub:
    """Transports of a swarm in one process, linked as the test says."""

    def __init__(self) -> None:
        self.codec = ControlCodec(COORDINATION_SCHEMAS)
        self.peers: dict[str, HubTransport] = {}

    def join(self, peer_id: str) -> HubTransport:
        transport = self.peers[peer_id] = HubTransport(self, peer_id)
        return transport

    def link(self, a: str, b: str) -> None:
        self.peers[a].links.add(b)
        self.peers[b].links.add(a)
