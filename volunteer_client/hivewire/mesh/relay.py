"""Peer-relayed signaling (docs/protocol.md): signals forwarded over neighbours' control channels.

A ``relay`` record leaves with ``ttl`` = ``RELAY_TTL``. The forwarding peer never trusts the ``from``
its neighbour wrote: it sets ``from`` to that neighbour (the link's authenticated peer), decrements
``ttl`` and forwards only to a peer it links to directly, dropping the record when ``ttl`` reaches 0. So
a relay can vouch only for the neighbour it heard from, and signed offers stay verifiable end to end.
Neighbours gossip who they link to in a small ``neighbours`` record, so a peer knows whom to ask.
"""

import logging
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from hivewire.mesh.control import RecordSchema
from hivewire.mesh.errors import ControlRecordError, LinkError
from hivewire.mesh.link import Link
from hivewire.mesh.neighbours import NeighbourTable, is_peer_id
from hivewire.mesh.paths import NoSignalingPath, Signal
from hivewire.signaling.messages import Relay

logger = logging.getLogger(__name__)

RELAY_TTL = 2  # sent: originator -> neighbour -> target, enough for two peers that share a neighbour
MAX_GOSSIPED_NEIGHBOURS = 64  # entries in one neighbours record; more than any max_neighbours setting
RELAY_RATE_PER_S = 10.0  # relays forwarded per second for one neighbour, sustained
RELAY_BURST = 40  # ... and in a burst; beyond that they are dropped (signaling retries, floods do not)
MAX_REMEMBERED_ROUTES = 1024  # peers whose last relaying neighbour we remember, for replies
_LOGGED_DROPS = 10  # drops logged one by one, then every 1000th


def _check_relay(record: Mapping[str, Any]) -> None:
    """The signaling package's Relay record is the one definition of what a relay may carry."""
    try:
        Relay.model_validate(record)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ControlRecordError(f"relay.{where}: {first['msg']}") from exc


def _check_neighbours(record: Mapping[str, Any]) -> None:
    peers = record["peers"]
    if len(peers) > MAX_GOSSIPED_NEIGHBOURS:
        raise ControlRecordError(f"neighbours.peers: {len(peers)} entries, at most {MAX_GOSSIPED_NEIGHBOURS}")
    if not all(is_peer_id(peer) for peer in peers):
        raise ControlRecordError("neighbours.peers: every entry must be a peer id")


# The record size is bounded by the control codec (64 KiB), which also bounds the relayed payload.
RELAY = RecordSchema("relay", {"to": str, "from": str, "kind": str, "payload": dict, "ttl": int}, _check_relay)
NEIGHBOURS = RecordSchema("neighbours", {"peers": list}, _check_neighbours)
MESH_SCHEMAS = (RELAY, NEIGHBOURS)


class _TokenBucket:
    """Allows ``rate_per_s`` events per second on average and ``burst`` at once."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate, self._burst, self._clock = rate_per_s, float(burst), clock
        self._tokens, self._at = float(burst), clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class RelayPath:
    """Signals through neighbours: originates relay records and handles those that arrive.

    ``links`` returns our open links by peer id; ``deliver`` receives signals addressed to us.
    """

    name = "relay"

    def __init__(
        self,
        self_id: str,
        *,
        links: Callable[[], Mapping[str, Link]],
        table: NeighbourTable,
        deliver: Callable[[Signal], None],
        clock: Callable[[], float],
    ) -> None:
        self._self_id = self_id
        self._links = links
        self._table = table
        self._deliver = deliver
        self._clock = clock
        self._buckets: dict[str, _TokenBucket] = {}
        self._heard_via: dict[str, str] = {}  # peer -> the neighbour that last relayed a signal from it
        self.forwarded = 0
        self.dropped = 0

    async def send_signal(self, to: str, kind: str, payload: Mapping[str, Any]) -> None:
        """Send through the neighbour that last relayed from ``to``, else one that says it links to ``to``."""
        links = self._links()
        heard_via = self._heard_via.get(to)
        relays = [heard_via] if heard_via is not None and heard_via in links else []
        relays += [peer for peer in self._table.relays_for(to, links) if peer not in relays]
        record = {"type": "relay", "to": to, "from": self._self_id, "kind": kind, "payload": dict(payload)}
        for relay in relays:
            try:
                links[relay].send_control({**record, "ttl": RELAY_TTL})
            except LinkError as exc:
                logger.info("cannot relay %s to %s through %s: %s", kind, to, relay, exc)
                continue
            logger.info("sent %s to %s through neighbour %s", kind, to, relay)
            return
        raise NoSignalingPath(f"no neighbour of ours reports a link to {to} (neighbours: {sorted(links)})")

    def forget(self, neighbour: str) -> None:
        """Drop per-neighbour state once its link is gone."""
        self._buckets.pop(neighbour, None)
        for peer in [peer for peer, via in self._heard_via.items() if via == neighbour]:
            del self._heard_via[peer]

    def on_record(self, neighbour: str, record: Mapping[str, Any]) -> None:
        """A validated relay record from ``neighbour``: deliver it to us or forward it one hop."""
        if record["to"] == self._self_id:
            # ``from`` was set by the neighbour that handed it over (or is the neighbour itself).
            sender = record["from"]
            if sender not in self._heard_via and len(self._heard_via) >= MAX_REMEMBERED_ROUTES:
                del self._heard_via[next(iter(self._heard_via))]  # the oldest route
            self._heard_via[sender] = neighbour
            self._deliver(Signal(sender=sender, kind=record["kind"], payload=record["payload"], via=neighbour))
            return
        bucket = self._buckets.setdefault(neighbour, _TokenBucket(RELAY_RATE_PER_S, RELAY_BURST, self._clock))
        forwarded = Relay.model_validate(record).forwarded(neighbour)
        target = self._links().get(record["to"])
        reason = None
        if forwarded is None:
            reason = "ttl exhausted"
        elif target is None or record["to"] == neighbour:
            reason = f"{record['to']} is not a neighbour of ours"
        elif not bucket.take():
            reason = f"over {RELAY_RATE_PER_S:g}/s from this neighbour"
        if reason is None and target is not None and forwarded is not None:
            try:
                target.send_control(forwarded.model_dump(by_alias=True))
                self.forwarded += 1
                return
            except LinkError as exc:
                reason = str(exc)
        self.dropped += 1
        if self.dropped <= _LOGGED_DROPS or self.dropped % 1000 == 0:  # a flooding neighbour cannot flood the log
            logger.info(
                "dropped a %s relayed by %s for %s (%d dropped so far): %s",
                record["kind"],
                neighbour,
                record["to"],
                self.dropped,
                reason,
            )
