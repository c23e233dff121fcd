"""Rooms of connected peers, one per run: one connection per peer id, presence events, relay, peer samples.

Without Redis a room holds every live peer of its run. With a RedisBus, the peers of a run are spread over
replicas: a signal for a peer connected elsewhere, presence events, replacements and bans go through the
bus, and samples come from the presence Redis shares."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Protocol

from redis.exceptions import RedisError

from hivewire_server.core.config import Settings
from hivewire_server.signaling import protocol
from hivewire_server.signaling.limits import Limits
from hivewire_server.signaling.protocol import CloseCode, PresenceState
from hivewire_server.signaling.redis_bus import Ban, Broadcast, BusMessage, Claim, Deliver, RedisBus

log = logging.getLogger("hivewire.signaling")


class Member(Protocol):
    """What the hub needs of a connection (signaling.connection.PeerConnection)."""

    run: str
    peer_id: str
    user_id: int
    connection_id: str

    def deliver(self, text: str) -> None: ...

    async def close(self, code: CloseCode, reason: str) -> None: ...


class Hub:
    """Owned by the app (created in its lifespan); `close()` disconnects every peer and stops the bus."""

    def __init__(self, *, sample_size: int, refresh_seconds: float) -> None:
        self._sample_size = sample_size
        self._refresh_seconds = refresh_seconds
        self._rooms: dict[str, dict[str, Member]] = {}
        self._bus: RedisBus | None = None
        self._refresher: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings) -> Hub:
        limits = Limits.from_settings(settings)
        hub = cls(sample_size=settings.initial_peers_count, refresh_seconds=limits.heartbeat_seconds)
        if settings.redis_url:
            hub._bus = await RedisBus.connect(
                settings.redis_url, presence_ttl_seconds=limits.silence_seconds, on_message=hub._on_bus_message
            )
            hub._refresher = asyncio.create_task(hub._refresh_presence(), name="signaling-presence")
            log.info("signaling relays between replicas through Redis")
        return hub

    def _members(self, run: str) -> dict[str, Member]:
        return self._rooms.get(run, {})

    def connected_count(self) -> int:
        """Peers connected to this replica (the /metrics gauge)."""
        return sum(len(room) for room in self._rooms.values())

    async def register(self, member: Member) -> None:
        """Adds a connected peer, closing an older connection of the same peer here or on another replica."""
        room = self._rooms.setdefault(member.run, {})
        older = room.get(member.peer_id)
        room[member.peer_id] = member
        if older is not None:
            await older.close(CloseCode.REPLACED, "replaced by a newer connection of this peer")
        if self._bus is not None:
            await self._bus.mark_live(member.run, [member.peer_id])
            await self._bus.publish(member.run, Claim(peer_id=member.peer_id, connection=member.connection_id))
        await self._announce(member, "joined")

    async def unregister(self, member: Member) -> None:
        """Removes a peer that left; a connection that was replaced leaves no trace (its successor is live)."""
        room = self._rooms.get(member.run)
        if room is None or room.get(member.peer_id) is not member:
            return
        del room[member.peer_id]
        if not room:
            del self._rooms[member.run]
        if self._bus is not None:
            await self._bus.mark_gone(member.run, member.peer_id)
        await self._announce(member, "left")

    async def relay(self, sender: Member, signal: protocol.Signal) -> bool:
        """Passes the envelope on with `from` filled in; False when no live peer of the run has that id."""
        text = protocol.relayed_signal(sender=sender.peer_id, signal=signal)
        target = self._members(sender.run).get(signal.to)
        if target is not None:
            target.deliver(text)
            return True
        if self._bus is not None and await self._bus.is_live(sender.run, signal.to):
            await self._bus.publish(sender.run, Deliver(to=signal.to, text=text))
            return True
        return False

    async def sample(self, run: str, *, exclude: str) -> list[str]:
        """A fresh random sample of live peers of the run (at most INITIAL_PEERS_COUNT), `exclude` left out."""
        if self._bus is not None:
            return await self._bus.sample(run, exclude=exclude, count=self._sample_size)
        peers = [peer for peer in self._members(run) if peer != exclude]
        return random.sample(peers, min(len(peers), self._sample_size))

    async def ban(self, run: str, user_id: int) -> None:
        """Closes the user's connections to the run on every replica (called once the ban is committed)."""
        await self._close_user(run, user_id)
        if self._bus is not None:
            await self._bus.publish(run, Ban(user_id=user_id))

    async def _close_user(self, run: str, user_id: int) -> None:
        for member in [m for m in self._members(run).values() if m.user_id == user_id]:
            await member.close(CloseCode.BANNED, "the user is banned from this run")

    async def _announce(self, member: Member, state: PresenceState) -> None:
        text = protocol.encode(protocol.Presence(peer_id=member.peer_id, state=state))
        for other in list(self._members(member.run).values()):
            if other.peer_id != member.peer_id:
                other.deliver(text)
        if self._bus is not None:
            await self._bus.publish(member.run, Broadcast(skip=member.peer_id, text=text))

    async def _on_bus_message(self, run: str, message: BusMessage) -> None:
        members = self._members(run)
        if isinstance(message, Deliver):
            if (target := members.get(message.to)) is not None:
                target.deliver(message.text)
        elif isinstance(message, Broadcast):
            for member in list(members.values()):
                if member.peer_id != message.skip:
                    member.deliver(message.text)
        elif isinstance(message, Claim):
            older = members.get(message.peer_id)
            if older is not None and older.connection_id != message.connection:
                del members[message.peer_id]  # gone from here without a "left": the peer lives on elsewhere
                if not members:
                    self._rooms.pop(run, None)
                await older.close(CloseCode.REPLACED, "replaced by a newer connection of this peer")
        else:
            await self._close_user(run, message.user_id)

    async def _refresh_presence(self) -> None:
        assert self._bus is not None
        while True:
            await asyncio.sleep(self._refresh_seconds)
            for run, room in list(self._rooms.items()):
                try:
                    await self._bus.mark_live(run, list(room))
                except (RedisError, OSError) as exc:
                    log.warning("could not refresh presence of run %s in Redis: %s", run, exc)

    async def close(self) -> None:
        """Disconnects every peer (1001) and announces their departure to the other replicas."""
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.wait({self._refresher})
        for room in list(self._rooms.values()):
            for member in list(room.values()):
                await member.close(CloseCode.GOING_AWAY, "the server is shutting down")
                await self.unregister(member)
        if self._bus is not None:
            await self._bus.close()
