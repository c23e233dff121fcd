"""Signaling across server replicas through Redis: pub/sub fan-out and shared presence.

Each run has a channel `hivewire:signal:<run>`; a replica publishes there what must reach peers connected
elsewhere (a relayed envelope, a presence event, a replacement or a ban) and every replica acts on what the
others published. Presence is a sorted set per run whose scores are expiry times: each replica refreshes
its own peers' entries every heartbeat interval, so the peers of a replica that dies drop out on their own.

Every replica subscribes to the pattern `hivewire:signal:*` once, at start: no subscription has to follow
peers around, and a message published after a replica started always reaches it."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

log = logging.getLogger("hivewire.signaling")

CHANNEL_PREFIX = "hivewire:signal:"
PRESENCE_PREFIX = "hivewire:presence:"
RECONNECT_SECONDS = 1.0  # pause before listening again after Redis went away
SUBSCRIBE_TIMEOUT_SECONDS = 5.0  # how long start-up waits for Redis to confirm the subscription


class Deliver(BaseModel):
    """A relayed signal for one peer; `text` is the exact envelope the peer gets."""

    op: Literal["deliver"] = "deliver"
    to: str
    text: str


class Broadcast(BaseModel):
    """A message for every peer of the run except `skip` (presence events)."""

    op: Literal["broadcast"] = "broadcast"
    skip: str
    text: str


class Claim(BaseModel):
    """`peer_id` connected again through `connection`: other replicas close their older connection."""

    op: Literal["claim"] = "claim"
    peer_id: str
    connection: str


class Ban(BaseModel):
    """The user was banned from the run: every replica closes the user's connections."""

    op: Literal["ban"] = "ban"
    user_id: int


BusMessage = Deliver | Broadcast | Claim | Ban


class _Packet(BaseModel):
    origin: str
    message: Annotated[BusMessage, Field(discriminator="op")]


Handler = Callable[[str, BusMessage], Awaitable[None]]


class RedisBus:
    """One replica's link to the others. Messages it published itself are not handed back to it."""

    def __init__(self, client: Redis, *, presence_ttl_seconds: float, on_message: Handler) -> None:
        self._client = client
        self._ttl = presence_ttl_seconds
        self._on_message = on_message
        self._origin = secrets.token_hex(8)
        self._pubsub: PubSub = client.pubsub()
        self._listener: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str, *, presence_ttl_seconds: float, on_message: Handler) -> RedisBus:
        """A bus already subscribed, so that nothing published after this returns is missed."""
        bus = cls(
            Redis.from_url(url, decode_responses=True), presence_ttl_seconds=presence_ttl_seconds, on_message=on_message
        )
        try:
            await bus._pubsub.psubscribe(f"{CHANNEL_PREFIX}*")
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECONDS):
                while await bus._pubsub.get_message(timeout=None) is None:
                    pass  # the first message is the subscription's confirmation
        except (RedisError, OSError, TimeoutError) as exc:
            await bus.close()
            raise RuntimeError(f"REDIS_URL is set but Redis does not answer: {exc}") from exc
        bus._listener = asyncio.create_task(bus._listen(), name="signaling-redis-listener")
        return bus

    async def publish(self, run: str, message: BusMessage) -> None:
        packet = _Packet(origin=self._origin, message=message)
        await self._client.publish(f"{CHANNEL_PREFIX}{run}", packet.model_dump_json())

    async def mark_live(self, run: str, peer_ids: Iterable[str]) -> None:
        """Records (or refreshes) these peers as connected for another presence lifetime."""
        expiry = time.time() + self._ttl
        scores = dict.fromkeys(peer_ids, expiry)
        if not scores:
            return
        key = f"{PRESENCE_PREFIX}{run}"
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.zadd(key, scores)
            pipe.expire(key, int(self._ttl) + 1)
            await pipe.execute()

    async def mark_gone(self, run: str, peer_id: str) -> None:
        await self._client.zrem(f"{PRESENCE_PREFIX}{run}", peer_id)

    async def is_live(self, run: str, peer_id: str) -> bool:
        expiry = await self._client.zscore(f"{PRESENCE_PREFIX}{run}", peer_id)
        return expiry is not None and expiry > time.time()

    async def sample(self, run: str, *, exclude: str, count: int) -> list[str]:
        """Up to `count` random live peers of the run on any replica, `exclude` left out."""
        if count <= 0:
            return []
        key = f"{PRESENCE_PREFIX}{run}"
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, "-inf", time.time())
            pipe.zrandmember(key, count + 1)
            _, members = await pipe.execute()
        return [peer for peer in members or [] if peer != exclude][:count]

    async def _listen(self) -> None:
        while True:
            try:
                async for item in self._pubsub.listen():
                    if item["type"] == "pmessage":
                        await self._dispatch(str(item["channel"]), str(item["data"]))
            except (RedisError, OSError) as exc:
                log.warning("lost Redis (%s); peers on other replicas are unreachable until it is back", exc)
                await asyncio.sleep(RECONNECT_SECONDS)

    async def _dispatch(self, channel: str, data: str) -> None:
        try:
            packet = _Packet.model_validate_json(data)
        except ValidationError as exc:
            log.warning("ignored a message on %s that is not a signaling packet: %s", channel, exc)
            return
        if packet.origin == self._origin:
            return
        try:
            await self._on_message(channel.removeprefix(CHANNEL_PREFIX), packet.message)
        except Exception:  # one bad message must not stop the fan-out for every run
            log.exception("failed to handle a %s message from replica %s", packet.message.op, packet.origin)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.wait({self._listener})
        await self._pubsub.aclose()
        await self._client.aclose()
