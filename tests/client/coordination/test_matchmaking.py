"""Agreement: a round starts with one round id on every member, or is abandoned and retried without the culprit."""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest

from hivewire.averaging import plan_partition
from hivewire.coordination import (
    Group,
    Matchmaker,
    MatchmakingSettings,
    RoundAbandoned,
    form_groups,
    part_weights,
    round_id,
)
from hivewire.identity import peer_id_from_key
from hivewire.mesh import ControlRecordError
from tests.client.coordination._support import GossipHub, HubTransport
from tests.support import eventually, within

FAST = MatchmakingSettings(
    group_size=4, connect_timeout_s=0.2, response_timeout_s=0.2, agreement_timeout_s=0.4, max_attempts=3
)
# Deadlines far beyond the tests' 10 s bound (tests.support.within): a test that finishes with these settings
# proves nothing waited for the link or agreement deadline, only for the short response deadline.
PATIENT = MatchmakingSettings(
    group_size=8, connect_timeout_s=50.0, response_timeout_s=0.3, agreement_timeout_s=60.0, max_attempts=3
)


def new_peers(count: int) -> list[str]:
    return sorted(peer_id_from_key(os.urandom(32)) for _ in range(count))


def swarm(peers: list[str], settings: MatchmakingSettings = FAST) -> tuple[GossipHub, dict[str, Matchmaker]]:
    """Every peer linked to every other, each with a matchmaker."""
    hub = GossipHub()
    matchmakers = {peer: Matchmaker(hub.join(peer), settings) for peer in peers}
    for a, b in itertools.combinations(peers, 2):
        hub.link(a, b)
    return hub, matchmakers


async def matchmake_all(
    matchmakers: dict[str, Matchmaker], epoch: int, views: dict[str, list[str]]
) -> dict[str, Group]:
    async def one(peer: str) -> tuple[str, Group]:
        return peer, await matchmakers[peer].matchmake(epoch, views[peer])

    results = await within(asyncio.gather(*(one(peer) for peer in views)), "matchmaking")
    return dict(results)


async def test_the_same_view_starts_the_same_round_on_every_member() -> None:
    peers = new_peers(7)
    _, matchmakers = swarm(peers)
    groups = await matchmake_all(matchmakers, 5, {peer: peers for peer in peers})
    expected = form_groups(peers, group_size=4, round_number=5)
    assert sorted({group.members for group in groups.values()}) == expected
    for peer, group in groups.items():
        assert peer in group.members
        assert (group.epoch, group.attempt) == (5, 0)
        assert group.round_id == round_id(5, group.members, 0)
        assert all(groups[member] == group for member in group.members)


async def test_a_member_that_needs_a_link_gets_one() -> None:
    peers = new_peers(3)
    hub = GossipHub()
    matchmakers = {peer: Matchmaker(hub.join(peer), FAST) for peer in peers}
    hub.link(peers[0], peers[1])
    hub.link(peers[1], peers[2])  # 0 and 2 are not neighbours
    groups = await matchmake_all(matchmakers, 1, {peer: peers for peer in peers})
    assert len({group.round_id for group in groups.values()}) == 1
    assert hub.peers[peers[0]].connects == [peers[2]] or hub.peers[peers[2]].connects == [peers[0]]


async def test_a_silent_member_abandons_the_round_and_the_retry_goes_on_without_it() -> None:
    peers = new_peers(4)
    hub, matchmakers = swarm(peers)
    silent = peers[2]
    hub.peers[silent].mute = True
    others = [peer for peer in peers if peer != silent]
    groups = await matchmake_all(matchmakers, 3, {peer: peers for peer in others})
    assert {group.members for group in groups.values()} == {tuple(others)}
    assert {(group.attempt, group.round_id) for group in groups.values()} == {(1, round_id(3, others, 1))}


async def test_a_member_with_another_view_is_left_out_of_the_retry() -> None:
    peers = new_peers(4)
    _, matchmakers = swarm(peers)
    odd, missing = peers[0], peers[3]
    views = {peer: peers for peer in peers}
    views[odd] = [peer for peer in peers if peer != missing]  # odd has not heard of `missing` yet
    groups = await matchmake_all(matchmakers, 8, views)
    agreed = tuple(peer for peer in peers if peer != odd)
    assert all(groups[peer].members == agreed and groups[peer].attempt == 1 for peer in agreed)
    assert len({groups[peer].round_id for peer in agreed}) == 1
    assert groups[odd].members == (odd,)  # everyone refused its group; it averages with no one this epoch


async def test_without_agreement_after_max_attempts_the_round_is_abandoned() -> None:
    peers = new_peers(2)
    settings = MatchmakingSettings(
        connect_timeout_s=0.1, response_timeout_s=0.1, agreement_timeout_s=0.2, max_attempts=1
    )
    hub, matchmakers = swarm(peers, settings)
    hub.peers[peers[1]].mute = True
    with pytest.raises(RoundAbandoned) as caught:
        await within(matchmakers[peers[0]].matchmake(2, peers), "giving up")
    assert caught.value.silent == {peers[1]}
    assert caught.value.round_id == round_id(2, peers, 0)


async def test_an_unreachable_member_is_dropped_without_waiting_for_a_deadline() -> None:
    peers = new_peers(3)
    hub = GossipHub()
    matchmakers = {peer: Matchmaker(hub.join(peer), PATIENT) for peer in peers[:2]}
    hub.link(peers[0], peers[1])
    groups = await matchmake_all(matchmakers, 4, {peer: peers for peer in peers[:2]})  # peers[2] is not in the swarm
    assert {group.members for group in groups.values()} == {tuple(peers[:2])}


async def test_proposals_that_do_not_fit_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    peers = new_peers(3)
    hub, _ = swarm(peers[:2])
    sender: HubTransport = hub.peers[peers[1]]
    proposal = {"type": "match_propose", "epoch": 1, "attempt": 0, "throughput": 0.0}
    for members in ([peers[1], peers[2]], [peers[0], peers[2]]):  # not for us; not from a member
        sender.send_control(peers[0], {**proposal, "members": members, "round_id": round_id(1, members, 0)})
    await asyncio.sleep(0.01)
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused a matchmaking record")]
    assert len(refusals) == 2
    assert all("must include the sender and us" in message for message in refusals)
    with pytest.raises(ControlRecordError, match="round_id"):  # a round id that does not hash its members
        sender.send_control(peers[0], {**proposal, "members": sorted(peers[:2]), "round_id": "0" * 32})


async def test_a_member_that_goes_silent_mid_matchmaking_is_dropped_at_the_response_deadline() -> None:
    peers = new_peers(5)
    hub, matchmakers = swarm(peers, PATIENT)
    dead, dying = peers[4], peers[3]
    hub.peers[dead].mute = True  # in every view (its progress record lingers), but its process is gone
    hub.peers[dying].mute_after = len(peers) - 1  # sends its attempt-0 proposals, then dies
    alive = peers[:3]
    dying_task = asyncio.ensure_future(matchmakers[dying].matchmake(6, peers))
    try:
        groups = await matchmake_all(matchmakers, 6, {peer: peers for peer in alive})
    finally:
        dying_task.cancel()
        await asyncio.gather(dying_task, return_exceptions=True)
    assert {group.members for group in groups.values()} == {tuple(alive)}
    # attempt 0 lost `dead` (silent to all), attempt 1 lost `dying`: the same two steps on every member
    assert {(group.attempt, group.round_id) for group in groups.values()} == {(2, round_id(6, alive, 2))}


async def test_a_member_that_answers_but_starts_late_is_waited_for() -> None:
    peers = new_peers(3)
    late = peers[1]
    _, matchmakers = swarm(peers, MatchmakingSettings(response_timeout_s=0.1, agreement_timeout_s=30.0))

    async def start_late() -> Group:
        await asyncio.sleep(0.5)  # five response deadlines: its trainer is still finishing a step
        return await matchmakers[late].matchmake(2, peers)

    on_time = [peer for peer in peers if peer != late]
    *groups, late_group = await within(
        asyncio.gather(*(matchmakers[peer].matchmake(2, peers) for peer in on_time), start_late()), "matchmaking"
    )
    assert {(group.attempt, group.members) for group in [*groups, late_group]} == {(0, tuple(peers))}


async def test_a_late_member_follows_the_others_to_their_attempt_without_proposing_a_lost_one() -> None:
    peers = new_peers(4)
    hub, matchmakers = swarm(peers, PATIENT)
    dead, late = peers[0], peers[3]
    hub.peers[dead].mute = True
    early = [peers[1], peers[2]]
    tasks = [asyncio.ensure_future(matchmakers[peer].matchmake(1, peers)) for peer in early]

    def moved_on() -> bool:
        return all(any(r["type"] == "match_propose" and r["attempt"] == 1 for r in hub.peers[p].sent) for p in early)

    await eventually(moved_on, "the early members proposing attempt 1")
    late_group = await within(matchmakers[late].matchmake(1, peers), "the late member's matchmaking")
    groups = await within(asyncio.gather(*tasks), "the early members' matchmaking")
    kept = tuple(peer for peer in peers if peer != dead)
    assert {(group.attempt, group.members) for group in [*groups, late_group]} == {(1, kept)}
    proposals = [record for record in hub.peers[late].sent if record["type"] == "match_propose"]
    assert {record["attempt"] for record in proposals} == {1}


async def test_a_member_done_with_the_epoch_leaves_a_late_proposer_to_drop_it() -> None:
    peers = new_peers(3)
    _, matchmakers = swarm(peers, PATIENT)
    done = peers[:2]
    await matchmake_all(matchmakers, 4, {peer: done for peer in done})  # they averaged epoch 4 without peers[2]
    # No one answers it (the epoch is over for them), so it is left alone at once, not after 60 s.
    group = await within(matchmakers[peers[2]].matchmake(4, peers), "the latecomer giving up")
    assert (group.attempt, group.members) == (1, (peers[2],))


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="connect_timeout_s"):
        MatchmakingSettings(connect_timeout_s=30.0, agreement_timeout_s=30.0)
    with pytest.raises(ValueError, match="response_timeout_s"):
        MatchmakingSettings(response_timeout_s=0.0)
    with pytest.raises(ValueError, match="group_size"):
        MatchmakingSettings(group_size=0)


@pytest.mark.parametrize(
    ("field", "value"), [("round_id", "not hex"), ("attempt", 65), ("epoch", -1), ("round_id", "A" * 32)]
)
def test_acks_are_checked_like_proposals(field: str, value: object) -> None:
    codec = GossipHub().codec
    ack = {"type": "match_ack", "round_id": "0" * 32, "epoch": 1, "attempt": 0}
    codec.encode(ack)
    with pytest.raises(ControlRecordError, match=field):
        codec.encode({**ack, field: value})


async def test_every_member_gets_the_same_throughputs_from_the_proposals() -> None:
    peers = new_peers(4)
    hub, matchmakers = swarm(peers)
    measured = dict(zip(peers, (4e6, 2e6, 0.0, 1e6), strict=True))  # peers[2]'s links have not measured yet
    for peer, value in measured.items():
        if value:  # its best link carried `value`, another one less
            others = [other for other in peers if other != peer]
            hub.peers[peer].throughputs = {others[0]: value / 2, others[1]: value}
    groups = await matchmake_all(matchmakers, 3, {peer: peers for peer in peers})
    maps = [group.throughputs for group in groups.values()]
    assert all(throughputs == maps[0] for throughputs in maps)
    known = [value for value in measured.values() if value]
    assert maps[0] == {**measured, peers[2]: sum(known) / len(known)}  # unknown: an average member's part
    sizes = plan_partition(7000, maps[0]).sizes
    assert sizes == (3000, 1500, 1750, 750)


@pytest.mark.parametrize(
    ("claimed", "expected"),
    [
        ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # nobody measured: equal parts
        ((6.0, 0.0, 2.0), (6.0, 4.0, 2.0)),  # unknown: the mean of the known claims
        ((1e12, 1.0, 1.0, 1.0), (8.0, 1.0, 1.0, 1.0)),  # a huge claim is capped at 8 times the median
        ((5.0,), (5.0,)),
    ],
)
def test_part_weights(claimed: tuple[float, ...], expected: tuple[float, ...]) -> None:
    members = [f"m{index}" for index in range(len(claimed))]
    assert part_weights(members, claimed) == dict(zip(members, expected, strict=True))
    assert Group("0" * 32, 1, 0, tuple(members), claimed).throughputs == dict(zip(members, expected, strict=True))


def test_a_group_without_claims_splits_equally() -> None:
    assert Group("0" * 32, 1, 0, ("a", "b")).throughputs == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="claims"):
        part_weights(["a", "b"], [1.0])
