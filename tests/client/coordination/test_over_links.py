"""Progress gossip and matchmaking over real aiortc Links on loopback, as they run in the mesh."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable

import pytest

from hivewire.coordination import Matchmaker, MatchmakingSettings, ProgressSettings, ProgressTracker
from hivewire.identity import CertificateVerifier, peer_id_from_key
from tests.client._fakes import RUN
from tests.client.coordination._links import LinkSwarm
from tests.client.coordination._support import Member
from tests.support import within


@pytest.fixture
async def link_swarm() -> AsyncIterator[LinkSwarm]:
    swarm = LinkSwarm()
    yield swarm
    await swarm.close()


async def test_a_line_of_three_gossips_gets_ready_and_agrees_on_one_round(
    link_swarm: LinkSwarm, cert_verifier: CertificateVerifier, make_member: Callable[..., Member]
) -> None:
    members = [make_member() for _ in range(3)]
    settings = ProgressSettings(target_batch_size=300)
    trackers, matchmakers = [], []
    for member in members:
        transport = link_swarm.join(member.peer_id)
        trackers.append(
            ProgressTracker(
                member.identity,
                lambda member=member: member.certificate,
                cert_verifier,
                transport,
                run=RUN,
                settings=settings,
            )
        )
        matchmakers.append(Matchmaker(transport, MatchmakingSettings(group_size=3)))
    a, b, c = (member.peer_id for member in members)
    await within(link_swarm.link(a, b), "linking a and b")
    await within(link_swarm.link(b, c), "linking b and c")  # a and c are two hops apart
    try:
        for tracker in trackers:
            await tracker.start()
            tracker.report(epoch=1, samples_accumulated=100, samples_per_second=10.0)
        views = await within(asyncio.gather(*(tracker.wait_ready() for tracker in trackers)), "readiness")
        assert all(view.peers == tuple(sorted((a, b, c))) and view.epoch == 1 for view in views)
        groups = await within(
            asyncio.gather(
                *(mm.matchmake(view.epoch, view.peers) for mm, view in zip(matchmakers, views, strict=True))
            ),
            "agreement",
        )
        assert len({group.round_id for group in groups}) == 1
        assert groups[0].members == tuple(sorted((a, b, c)))
        assert c in link_swarm.transports[a].neighbours  # matchmaking linked the two ends of the line
        assert all(sum(tracker.stats.refused.values()) == 0 for tracker in trackers)
    finally:
        for tracker in trackers:
            await tracker.close()


async def test_a_member_whose_links_die_is_dropped_without_waiting_out_agreement(link_swarm: LinkSwarm) -> None:
    peers = sorted(peer_id_from_key(os.urandom(32)) for _ in range(3))
    transports = {peer: link_swarm.join(peer) for peer in peers}
    a, b, dead = peers
    for x, y in ((a, b), (a, dead), (b, dead)):
        await within(link_swarm.link(x, y), f"linking {x} and {y}")
    # Deadlines beyond the test's 10 s bound: only the link stage (a closed link) or the response stage may act.
    settings = MatchmakingSettings(connect_timeout_s=50.0, response_timeout_s=1.0, agreement_timeout_s=60.0)
    matchmakers = {peer: Matchmaker(transports[peer], settings) for peer in (a, b)}
    await transports[dead].close()  # its process died: its progress record still puts it in every view
    groups = await within(asyncio.gather(*(matchmakers[peer].matchmake(2, peers) for peer in (a, b))), "agreement")
    assert {(group.attempt, group.members) for group in groups} == {(1, (a, b))}
    assert len({group.round_id for group in groups}) == 1
