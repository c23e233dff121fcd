"""Agreement on a group: a round starts only when every member proposed the same membership.

At the epoch boundary each ready peer computes its group from its own view (grouping.py). Each attempt
goes through three stages, each with its own deadline:

1. **link** (``connect_timeout_s``): open direct links to members that are not neighbours yet. A member we
   cannot reach ends the attempt at once; nothing is proposed in an attempt we already know is lost.
2. **response** (``response_timeout_s``): send each member our proposal ``{round_id, epoch, attempt,
   members}`` with ``round_id = blake2b(epoch, attempt, sorted members)``. A live member answers at once,
   with its own proposal or, when it has not proposed this attempt to us (it is still training, or elsewhere
   in matchmaking), with a ``match_ack``. A member that answered nothing by the deadline is silent (its
   process died or its link stalled, while its progress record lingers in the view): the attempt ends then,
   not at the agreement deadline.
3. **agreement** (``agreement_timeout_s`` per attempt, from the start of matchmaking): the round starts
   once a proposal with our round id has come from every other member. A member that acknowledged us but
   is slow to start (its trainer is finishing a step) is waited for until this deadline.

An attempt is also abandoned at once when a member proposed another membership for the same (epoch,
attempt) (its view differs). The next attempt keeps the group minus the members lost; it does not regroup
the run, so groups that did agree are left alone. Members that saw the same failure (a dead member is
silent to all) compute the same smaller group and round id. A member that already moved to a later attempt
tells us whom it lost: we follow it there with our group cut down to its members, instead of finding the
same loss again on our own.

Each proposal carries its sender's measured link throughput (bytes/s, 0 when unknown), so every member of
an agreed group holds the same claims from the same proposals: ``Group.throughputs`` turns them into the
butterfly's part weights (DeDLOC's adaptive averaging) without a further message. Known limit: a member
that claims different throughputs to different members makes their partitions differ, and the averaging
round then refuses mismatched parts between honest members too, for that round; an echo of the claims
would catch it at the cost of one more round trip.

Agreement is best effort, not consensus: a member reachable by some members but not others can make one
member start a round that another abandoned; the averaging round's own exclusion of absent members covers
that. Proposals and acks that arrive early (a member may start before us) are kept, bounded per peer.
"""

import asyncio
import contextlib
import logging
import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from hivewire.coordination.errors import RoundAbandoned
from hivewire.coordination.grouping import group_of
from hivewire.coordination.records import COORDINATION_SCHEMAS, MAX_LINK_THROUGHPUT, round_id
from hivewire.coordination.transport import GossipTransport, measured_throughput
from hivewire.mesh import ControlCodec, ControlRecordError, MeshError

logger = logging.getLogger(__name__)

MAX_PART_RATIO = 8.0  # no member's part exceeds this many times the median member's part
_Key = tuple[int, int]  # (epoch, attempt)
_V = TypeVar("_V")


@dataclass(frozen=True)
class MatchmakingSettings:
    """Deadlines and bounds of matchmaking; every peer of a run should use the same values."""

    group_size: int = 16  # members of a group at most (the run spec's group size)
    connect_timeout_s: float = 20.0  # stage "link": to open a direct link to a member that is not a neighbour
    response_timeout_s: float = 5.0  # stage "response": after our proposals went out, a member that sent neither
    # a proposal nor an ack by then is dropped (a control-channel round trip, even through TURN, is well below)
    agreement_timeout_s: float = 30.0  # stage "agreement", per attempt, link setup included: attempt k ends
    # (k + 1) times this after matchmaking began (hivemind's matchmaking_time is 15 s, without link setup)
    max_attempts: int = 3  # attempts per epoch, each without the members the previous one lost
    proposals_per_peer: int = 8  # proposals (and acks) kept per sender (newest win); early ones wait here for us
    max_proposers: int = 1024  # senders whose proposals are kept; proposals from more are dropped

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.max_attempts < 1:
            raise ValueError(f"need group_size >= 1 and max_attempts >= 1, got {self}")
        if not 0 < self.connect_timeout_s < self.agreement_timeout_s:
            raise ValueError(f"need 0 < connect_timeout_s < agreement_timeout_s, got {self}")
        if not 0 < self.response_timeout_s < self.agreement_timeout_s:
            raise ValueError(f"need 0 < response_timeout_s < agreement_timeout_s, got {self}")


def part_weights(members: Sequence[str], claimed: Sequence[float]) -> dict[str, float]:
    """Each member's weight for ``plan_partition``: its claimed throughput, an average one when it claimed none.

    A claim of 0 means unknown (not measured yet), so that member gets the mean of the known claims, and
    equal parts when no member knows. A member is never left without a part for lack of a measurement.
    No weight exceeds ``MAX_PART_RATIO`` times the median: a member that claims a huge throughput cannot take
    the whole tensor to reduce and then withhold it. Every member computes this from the same claims in the
    same order, so the floats are bit-identical.
    """
    if len(members) != len(claimed):
        raise ValueError(f"{len(claimed)} claims for {len(members)} members")
    known = [value for value in claimed if value > 0]
    fill = sum(known) / len(known) if known else 1.0
    weights = [value if value > 0 else fill for value in claimed]
    cap = MAX_PART_RATIO * statistics.median(weights) if weights else 0.0
    return {member: min(weight, cap) for member, weight in zip(members, weights, strict=True)}


@dataclass(frozen=True)
class Group:
    """An agreed group: every member confirmed exactly these ``members`` under ``round_id``."""

    round_id: str
    epoch: int
    attempt: int
    members: tuple[str, ...]  # sorted; ourselves included (alone when no one else was left)
    claimed: tuple[float, ...] = ()  # each member's throughput from its proposal (bytes/s, 0 = unknown); () = none

    @property
    def throughputs(self) -> dict[str, float]:
        """``butterfly_allreduce``'s throughputs: the same map on every member, parts in proportion to the claims."""
        return part_weights(self.members, self.claimed or (0.0,) * len(self.members))


class _Superseded(Exception):
    """Members of our group already proposed ``attempt``: follow them there with ``members`` (theirs)."""

    def __init__(self, attempt: int, members: frozenset[str], by: frozenset[str]) -> None:
        super().__init__(f"{sorted(by)} moved on to attempt {attempt}")
        self.attempt = attempt
        self.members = members
        self.by = by


@dataclass
class _Heard:
    """What one sender told us, per (epoch, attempt); insertion order is arrival order, bounded per sender."""

    proposals: dict[_Key, tuple[str, frozenset[str], float]]  # -> (round id, members, throughput claimed)
    acks: dict[_Key, str]  # -> the round id of our proposal it acknowledged


class Matchmaker:
    """Forms this peer's group for an epoch's round over ``transport``."""

    def __init__(self, transport: GossipTransport, settings: MatchmakingSettings | None = None) -> None:
        self.peer_id = transport.peer_id
        self.settings = settings or MatchmakingSettings()
        self._transport = transport
        self._codec = ControlCodec(COORDINATION_SCHEMAS)
        self._heard: dict[str, _Heard] = {}
        self._proposed: dict[_Key, frozenset[str]] = {}  # (epoch, attempt) -> members we sent our proposal to
        self._done_through = -1  # the last epoch whose matchmaking ended here: proposals for it go unanswered
        self._changed = asyncio.Event()  # replaced by a fresh one on every arrival; waiters hold the old one
        transport.on_records(("match_propose", "match_ack"), self._on_record)

    async def matchmake(self, epoch: int, peers: Collection[str]) -> Group:
        """Our agreed group for ``epoch`` among ``peers`` (the view's peers at that epoch).

        Tries up to ``max_attempts`` times, each without the members the last one lost; raises the last
        RoundAbandoned when none agreed.
        """
        self._forget_before(epoch)
        members = group_of(self.peer_id, peers, group_size=self.settings.group_size, round_number=epoch)
        start = asyncio.get_running_loop().time()
        attempt = 0
        try:
            while True:
                # Deadlines sit on a grid from the start, so a member that gave up early (it saw a disagreeing
                # proposal) still waits for one that only gave up at the deadline of the attempt before.
                deadline = start + (attempt + 1) * self.settings.agreement_timeout_s
                try:
                    return await self._agree(epoch, members, attempt, deadline)
                except _Superseded as jump:
                    left_out = sorted(set(members) - jump.members)
                    logger.info(
                        "epoch %d attempt %d: %s; following without %s", epoch, attempt, jump, left_out or "none"
                    )
                    attempt = jump.attempt
                    members = tuple(member for member in members if member in jump.members)
                except RoundAbandoned as exc:
                    logger.warning("epoch %d attempt %d: %s", epoch, attempt, exc)
                    attempt += 1
                    if attempt == self.settings.max_attempts:
                        raise
                    lost = exc.silent | exc.disagreeing
                    members = tuple(member for member in members if member not in lost)
        finally:
            self._done_through = max(self._done_through, epoch)

    async def _agree(self, epoch: int, members: Collection[str], attempt: int, deadline: float) -> Group:
        """One attempt through its three stages; RoundAbandoned (or _Superseded) without agreement."""
        group = tuple(sorted(set(members) | {self.peer_id}))
        rid = round_id(epoch, group, attempt)
        others = frozenset(group) - {self.peer_id}
        if others:
            self._follow_ahead(epoch, attempt, {peer: self._heard.get(peer, _Heard({}, {})) for peer in others})
            unreachable = await self._link(rid, others)
            if unreachable:
                raise RoundAbandoned(rid, silent=unreachable, disagreeing=frozenset())
        own = min(measured_throughput(self._transport), MAX_LINK_THROUGHPUT)
        claimed = {self.peer_id: own}
        if others:
            proposal = {"type": "match_propose", "round_id": rid, "epoch": epoch, "attempt": attempt}
            proposal |= {"members": list(group), "throughput": own}
            self._proposed[(epoch, attempt)] = others
            silent = frozenset(peer for peer in others if not self._send(peer, proposal))
            if silent:
                raise RoundAbandoned(rid, silent=silent, disagreeing=frozenset())
            response_deadline = min(deadline, asyncio.get_running_loop().time() + self.settings.response_timeout_s)
            await self._await_agreement(rid, epoch, attempt, others, response_deadline, deadline)
            claimed |= {peer: self._heard[peer].proposals[(epoch, attempt)][2] for peer in others}
        group_claims = tuple(claimed[member] for member in group)
        logger.info(
            "epoch %d attempt %d: round %s starts with %d members, link throughputs %s",
            epoch,
            attempt,
            rid,
            len(group),
            ", ".join(
                f"{member[:8]} {f'{value / 1e6:.2f} MB/s' if value else 'unknown'}"
                for member, value in zip(group, group_claims, strict=True)
            ),
        )
        return Group(round_id=rid, epoch=epoch, attempt=attempt, members=group, claimed=group_claims)

    async def _link(self, rid: str, others: frozenset[str]) -> frozenset[str]:
        """Stage "link": open links to members that are not neighbours; the members we could not reach."""
        missing = [peer for peer in others if peer not in self._transport.neighbours]
        results = await asyncio.gather(*(self._connect(rid, peer) for peer in missing))
        return frozenset(peer for peer, reached in zip(missing, results, strict=True) if not reached)

    async def _connect(self, rid: str, peer: str) -> bool:
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await self._transport.connect(peer)
        except (MeshError, TimeoutError) as exc:
            logger.info("round %s: cannot reach member %s: %s", rid, peer, str(exc) or "connect timed out")
            return False
        return True

    def _send(self, peer: str, record: dict[str, Any]) -> bool:
        try:
            self._transport.send_control(peer, record)
        except MeshError as exc:
            logger.info("%s for round %s not sent to %s: %s", record["type"], record["round_id"], peer, exc)
            return False
        return True

    async def _await_agreement(
        self, rid: str, epoch: int, attempt: int, others: frozenset[str], response_deadline: float, deadline: float
    ) -> None:
        """Stages "response" and "agreement": wait for every member's proposal of ``rid``."""
        loop = asyncio.get_running_loop()
        key = (epoch, attempt)
        while True:
            changed = self._changed
            heard = {peer: self._heard.get(peer, _Heard({}, {})) for peer in others}
            proposed = {peer: h.proposals[key][0] for peer, h in heard.items() if key in h.proposals}
            confirmed = frozenset(peer for peer, proposal in proposed.items() if proposal == rid)
            disagreeing = frozenset(proposed) - confirmed
            if confirmed == others:
                return
            if disagreeing:
                raise RoundAbandoned(rid, silent=frozenset(), disagreeing=disagreeing)
            self._follow_ahead(epoch, attempt, heard)
            now = loop.time()
            if now >= deadline:
                raise RoundAbandoned(rid, silent=others - confirmed, disagreeing=frozenset())
            if now >= response_deadline:
                acked = frozenset(peer for peer, h in heard.items() if h.acks.get(key) == rid)
                silent = others - confirmed - acked
                if silent:
                    raise RoundAbandoned(rid, silent=silent, disagreeing=frozenset())
            wake = response_deadline if now < response_deadline else deadline
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wake - now)

    def _follow_ahead(self, epoch: int, attempt: int, heard: dict[str, _Heard]) -> None:
        """_Superseded when members proposed a later attempt of this epoch that we may still make.

        Their proposals there name the members they kept; we keep only those too. A proposal beyond
        ``max_attempts`` is ignored: no honest member makes one.
        """
        ahead = [
            (key[1], peer, members)
            for peer, h in heard.items()
            for key, (_, members, _) in h.proposals.items()
            if key[0] == epoch and attempt < key[1] < self.settings.max_attempts
        ]
        if not ahead:
            return
        target = max(later for later, _, _ in ahead)
        at_target = [(peer, members) for later, peer, members in ahead if later == target]
        kept = frozenset.intersection(*(members for _, members in at_target))
        raise _Superseded(target, kept, frozenset(peer for peer, _ in at_target))

    def _on_record(self, sender: str, record: dict[str, Any]) -> None:
        """Keep a proposal for a group we are in (and acknowledge it) or an ack; drop anything else, logged."""
        try:
            self._codec.validate(record)
            kind = record["type"]
            if kind not in ("match_propose", "match_ack"):
                raise ControlRecordError(f"expected a match_propose or match_ack record, got {kind!r}")
            if kind == "match_propose" and (sender not in record["members"] or self.peer_id not in record["members"]):
                raise ControlRecordError(f"members {record['members']} must include the sender and us")
        except ControlRecordError as exc:
            logger.warning("refused a matchmaking record from %s: %s", sender, exc)
            return
        heard = self._heard.get(sender)
        if heard is None:
            if len(self._heard) >= self.settings.max_proposers:
                logger.warning("dropped a %s from %s: max_proposers=%d", kind, sender, self.settings.max_proposers)
                return
            heard = self._heard[sender] = _Heard({}, {})
        key = (record["epoch"], record["attempt"])
        if kind == "match_ack":
            _keep(heard.acks, key, record["round_id"], self.settings.proposals_per_peer)
        else:
            proposal = (record["round_id"], frozenset(record["members"]), record["throughput"])
            _keep(heard.proposals, key, proposal, self.settings.proposals_per_peer)
            self._acknowledge(sender, record)
        self._changed.set()
        self._changed = asyncio.Event()

    def _acknowledge(self, sender: str, record: dict[str, Any]) -> None:
        """Tell a proposer we are alive, unless our own proposal for that attempt already did or its epoch is over."""
        key = (record["epoch"], record["attempt"])
        if record["epoch"] <= self._done_through or sender in self._proposed.get(key, ()):
            return
        ack = {"type": "match_ack", "round_id": record["round_id"], "epoch": key[0], "attempt": key[1]}
        self._send(sender, ack)

    def _forget_before(self, epoch: int) -> None:
        """Drop what we heard and proposed for epochs before the previous one: their rounds are over."""
        for sender, heard in list(self._heard.items()):
            for kept in (heard.proposals, heard.acks):
                for key in [key for key in kept if key[0] < epoch - 1]:
                    del kept[key]
            if not heard.proposals and not heard.acks:
                del self._heard[sender]
        for key in [key for key in self._proposed if key[0] < epoch - 1]:
            del self._proposed[key]


def _keep(kept: dict[_Key, _V], key: _Key, value: _V, bound: int) -> None:
    """Store ``value`` as the newest entry under ``key``, dropping the oldest beyond ``bound``."""
    kept.pop(key, None)
    kept[key] = value
    while len(kept) > bound:
        kept.pop(next(iter(kept)))
