"""Agreement: a round starts with one round id on every member, or is abandoned and retried without the culprit."""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest

from hivewire.coordination import Group, Matchmaker, MatchmakingSettings, RoundAbandoned, form_groups, round_id
from hivewire.identity import peer_id_from_key
from hivewire.mesh import ControlRecordError
from tests.client.coordination._support import GossipHub, HubTransport
from tests.support import within

FAST = MatchmakingSettings(group_size=4, connect_timeout_s=0.2, agreement_timeout_s=0.4, max_attempts=3)


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
    hub, matchmakers = swarm(peers, MatchmakingSettings(connect_timeout_s=0.1, agreement_timeout_s=0.2, max_attempts=1))
    hub.peers[peers[1]].mute = True
    with pytest.raises(RoundAbandoned) as caught:
        await within(matchmakers[peers[0]].matchmake(2, peers), "giving up")
    assert caught.value.silent == {peers[1]}
    assert caught.value.round_id == round_id(2, peers, 0)


async def test_an_unreachable_member_counts_as_silent() -> None:
    peers = new_peers(3)
    hub = GossipHub()
    matchmakers = {peer: Matchmaker(hub.join(peer), FAST) for peer in peers[:2]}
    hub.link(peers[0], peers[1])
    groups = await matchmake_all(matchmakers, 4, {peer: peers for peer in peers[:2]})  # peers[2] is not in the swarm
    assert {group.members for group in groups.values()} == {tuple(peers[:2])}


async def test_proposals_that_do_not_fit_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    peers = new_peers(3)
    hub, _ = swarm(peers[:2])
    sender: HubTransport = hub.peers[peers[1]]
    proposal = {"type": "match_propose", "epoch": 1, "attempt": 0}
    for members in ([peers[1], peers[2]], [peers[0], peers[2]]):  # not for us; not from a member
        sender.send_control(peers[0], {**proposal, "members": members, "round_id": round_id(1, members, 0)})
    await asyncio.sleep(0.01)
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused a proposal")]
    assert len(refusals) == 2
    assert all("must include the sender and us" in message for message in refusals)
    with pytest.raises(ControlRecordError, match="round_id"):  # a round id that does not hash its members
        sender.send_control(peers[0], {**proposal, "members": sorted(peers[:2]), "round_id": "0" * 32})


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="connect_timeout_s"):
        MatchmakingSettings(connect_timeout_s=30.0, agreement_timeout_s=30.0)
    with pytest.raises(ValueError, match="group_size"):
        MatchmakingSettings(group_size=0)
