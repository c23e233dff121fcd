"""Agreement on a group: a round starts only when every member proposed the same membership.

At the epoch boundary each ready peer computes its group from its own view (grouping.py), opens direct
links to members that are not neighbours yet, and sends each of them its proposal
``{round_id, epoch, attempt, members}`` with ``round_id = blake2b(epoch, attempt, sorted members)``. The
round starts once a proposal with our round id has come from every other member. It is abandoned:

* at once, when a member proposed another membership for the same (epoch, attempt): its view differs;
* at its deadline, naming the members we heard nothing matching from (silent, unreachable); attempt ``k``
  ends ``(k + 1) * agreement_timeout_s`` after matchmaking began.

The next attempt keeps the group minus those members; it does not regroup the run, so groups that did
agree are left alone. Members that saw the same failure compute the same smaller group and round id.
Proposals are kept when they arrive early (a member may start before us), bounded per peer.
"""

import asyncio
import contextlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from hivewire.coordination.errors import RoundAbandoned
from hivewire.coordination.grouping import group_of
from hivewire.coordination.records import COORDINATION_SCHEMAS, round_id
from hivewire.coordination.transport import GossipTransport
from hivewire.mesh import ControlCodec, ControlRecordError, MeshError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatchmakingSettings:
    """Deadlines and bounds of matchmaking; every peer of a run should use the same values."""

    group_size: int = 16  # members of a group at most (the run spec's group size)
    connect_timeout_s: float = 20.0  # to open a direct link to a member that is not a neighbour
    agreement_timeout_s: float = 30.0  # per attempt, link setup included: attempt k ends (k + 1) times this
    # after matchmaking began (hivemind's matchmaking_time is 15 s, without link setup)
    max_attempts: int = 3  # attempts per epoch, each without the members the previous one lost
    proposals_per_peer: int = 8  # proposals kept per sender (newest win); early ones wait here for us
    max_proposers: int = 1024  # senders whose proposals are kept; proposals from more are dropped

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.max_attempts < 1:
            raise ValueError(f"need group_size >= 1 and max_attempts >= 1, got {self}")
        if not 0 < self.connect_timeout_s < self.agreement_timeout_s:
            raise ValueError(f"need 0 < connect_timeout_s < agreement_timeout_s, got {self}")


@dataclass(frozen=True)
class Group:
    """An agreed group: every member confirmed exactly these ``members`` under ``round_id``."""

    round_id: str
    epoch: int
    attempt: int
    members: tuple[str, ...]  # sorted; ourselves included (alone when no one else was left)


class Matchmaker:
    """Forms this peer's group for an epoch's round over ``transport``."""

    def __init__(self, transport: GossipTransport, settings: MatchmakingSettings | None = None) -> None:
        self.peer_id = transport.peer_id
        self.settings = settings or MatchmakingSettings()
        self._transport = transport
        self._codec = ControlCodec(COORDINATION_SCHEMAS)
        # sender -> (epoch, attempt) -> the round id it proposed; insertion order is arrival order
        self._proposals: dict[str, dict[tuple[int, int], str]] = {}
        self._changed = asyncio.Event()  # replaced by a fresh one on every arrival; waiters hold the old one
        transport.on_records(("match_propose",), self._on_record)

    async def matchmake(self, epoch: int, peers: Collection[str]) -> Group:
        """Our agreed group for ``epoch`` among ``peers`` (the view's peers at that epoch).

        Tries up to ``max_attempts`` times, each without the members the last one lost; raises the last
        RoundAbandoned when none agreed.
        """
        self._forget_before(epoch)
        members = group_of(self.peer_id, peers, group_size=self.settings.group_size, round_number=epoch)
        start = asyncio.get_running_loop().time()
        attempt = 0
        while True:
            # Deadlines sit on a grid from the start, so a member that gave up early (it saw a disagreeing
            # proposal) still waits for one that only gave up at the deadline of the attempt before.
            deadline = start + (attempt + 1) * self.settings.agreement_timeout_s
            try:
                return await self._agree(epoch, members, attempt, deadline)
            except RoundAbandoned as exc:
                logger.warning("epoch %d attempt %d: %s", epoch, attempt, exc)
                attempt += 1
                if attempt == self.settings.max_attempts:
                    raise
                lost = exc.silent | exc.disagreeing
                members = tuple(member for member in members if member not in lost)

    async def _agree(self, epoch: int, members: Collection[str], attempt: int, deadline: float) -> Group:
        """One attempt: propose ``members`` to the others, wait for theirs; RoundAbandoned without agreement."""
        group = tuple(sorted(set(members) | {self.peer_id}))
        rid = round_id(epoch, group, attempt)
        others = frozenset(group) - {self.peer_id}
        if others:
            proposal = {"type": "match_propose", "round_id": rid, "epoch": epoch, "attempt": attempt}
            await asyncio.gather(*(self._propose(peer, {**proposal, "members": list(group)}) for peer in others))
            await self._await_agreement(rid, epoch, attempt, others, deadline)
        logger.info("epoch %d attempt %d: round %s starts with %d members", epoch, attempt, rid, len(group))
        return Group(round_id=rid, epoch=epoch, attempt=attempt, members=group)

    async def _propose(self, peer: str, record: dict[str, Any]) -> None:
        """Link to ``peer`` if need be and send it our proposal; a failure leaves it silent to us."""
        try:
            if peer not in self._transport.neighbours:
                async with asyncio.timeout(self.settings.connect_timeout_s):
                    await self._transport.connect(peer)
            self._transport.send_control(peer, record)
        except (MeshError, TimeoutError) as exc:
            logger.info(
                "round %s: cannot reach member %s: %s", record["round_id"], peer, str(exc) or "connect timed out"
            )

    async def _await_agreement(
        self, rid: str, epoch: int, attempt: int, others: frozenset[str], deadline: float
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            changed = self._changed
            heard = {peer: self._proposals.get(peer, {}).get((epoch, attempt)) for peer in others}
            confirmed = frozenset(peer for peer, proposed in heard.items() if proposed == rid)
            disagreeing = frozenset(peer for peer, proposed in heard.items() if proposed not in (None, rid))
            if confirmed == others:
                return
            if disagreeing:
                raise RoundAbandoned(rid, silent=frozenset(), disagreeing=disagreeing)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RoundAbandoned(rid, silent=others - confirmed, disagreeing=frozenset())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def _on_record(self, sender: str, record: dict[str, Any]) -> None:
        """Keep a proposal for a group we are in; anything else is dropped with a log line."""
        try:
            self._codec.validate(record)
            if record["type"] != "match_propose":
                raise ControlRecordError(f"expected a match_propose record, got {record['type']!r}")
            members = record["members"]
            if sender not in members or self.peer_id not in members:
                raise ControlRecordError(f"members {members} must include the sender and us")
        except ControlRecordError as exc:
            logger.warning("refused a proposal from %s: %s", sender, exc)
            return
        kept = self._proposals.get(sender)
        if kept is None:
            if len(self._proposals) >= self.settings.max_proposers:
                logger.warning("dropped a proposal from %s: max_proposers=%d", sender, self.settings.max_proposers)
                return
            kept = self._proposals[sender] = {}
        key = (record["epoch"], record["attempt"])
        kept.pop(key, None)
        kept[key] = record["round_id"]
        while len(kept) > self.settings.proposals_per_peer:
            kept.pop(next(iter(kept)))
        self._changed.set()
        self._changed = asyncio.Event()

    def _forget_before(self, epoch: int) -> None:
        """Drop proposals of epochs before the previous one: their rounds are over."""
        for sender, kept in list(self._proposals.items()):
            for key in [key for key in kept if key[0] < epoch - 1]:
                del kept[key]
            if not kept:
                del self._proposals[sender]
