"""Progress gossip and the global view: records travel a bounded number of hops, once, and expire."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import pytest

from hivewire.coordination import (
    Progress,
    ProgressSettings,
    ProgressTracker,
    announce_interval_s,
    estimate_global_progress,
    measured_throughput,
    sign_farewell,
    sign_progress,
)
from hivewire.identity import CertificateVerifier
from tests.client._fakes import RUN
from tests.client.coordination._support import Clock, GossipHub, Member
from tests.support import eventually

NOW = 1_764_000_000.0
MakeTracker = Callable[..., ProgressTracker]


@pytest.fixture
async def make_tracker(
    cert_verifier: CertificateVerifier, make_member: Callable[..., Member]
) -> AsyncIterator[MakeTracker]:
    """Start a tracker for a new member on ``hub``; every tracker is closed at teardown."""
    trackers: list[ProgressTracker] = []

    async def make(hub: GossipHub, *, clock: Callable[[], float], **settings: object) -> ProgressTracker:
        member = make_member()
        tracker = ProgressTracker(
            member.identity,
            lambda: member.certificate,
            cert_verifier,
            hub.join(member.peer_id),
            run=RUN,
            settings=ProgressSettings(**{"target_batch_size": 1000, **settings}),  # type: ignore[arg-type]
            clock=clock,
        )
        trackers.append(tracker)
        await tracker.start()
        return tracker

    yield make
    for tracker in trackers:
        await tracker.close()


def record(peer: str, epoch: int, samples: int, rate: float, at: float = NOW) -> Progress:
    return Progress(peer, epoch, samples, rate, at)


def test_the_view_counts_the_epoch_most_peers_are_at_and_extrapolates() -> None:
    others = [record("a", 4, 300, 10.0, NOW - 2), record("b", 4, 200, 5.0), record("c", 3, 900, 50.0)]
    view = estimate_global_progress(others, local=record("me", 4, 100, 5.0), target_batch_size=1000, now=NOW)
    assert (view.epoch, view.local_epoch, view.peers, view.num_peers) == (4, 4, ("a", "b", "me"), 4)
    assert view.samples_accumulated == 600  # c's samples belong to another epoch
    assert view.estimated_samples == 620  # a worked 2 s more at 10 samples/s since its record
    assert view.samples_per_second == 20.0
    assert view.eta_s == pytest.approx(19.0)
    assert not view.ready
    assert not view.behind


def test_the_view_is_ready_at_the_target_and_knows_when_we_are_behind() -> None:
    others = [record("a", 5, 700, 10.0), record("b", 5, 250, 10.0, NOW - 5)]
    view = estimate_global_progress(others, local=record("me", 4, 50, 1.0), target_batch_size=1000, now=NOW)
    assert view.epoch == 5
    assert view.behind
    assert view.estimated_samples == 1000
    assert view.ready
    assert view.eta_s == 0


def test_one_peer_claiming_a_far_epoch_does_not_move_the_run() -> None:
    others = [record("liar", 10**9, 10**9, 1e6), record("a", 2, 10, 1.0)]
    view = estimate_global_progress(others, local=record("me", 2, 10, 1.0), target_batch_size=1000, now=NOW)
    assert view.epoch == 2
    assert not view.ready
    tie = estimate_global_progress(
        [record("a", 3, 0, 0.0)], local=record("me", 2, 0, 0.0), target_batch_size=9, now=NOW
    )
    assert tie.epoch == 3  # a tie goes to the higher epoch: the peer that finished a round is not behind
    assert tie.eta_s == math.inf  # no throughput at that epoch


@pytest.mark.parametrize(
    ("eta_s", "peers", "expected_s"),
    [(math.inf, 5, 10.0), (600.0, 5, 10.0), (0.1, 5, 0.5), (8.0, 1, 2.0), (9.0, 20, 7.5)],
)
def test_records_are_announced_more_often_near_the_target_within_bounds(
    eta_s: float, peers: int, expected_s: float
) -> None:
    view = estimate_global_progress(
        [record(f"p{index}", 1, 0, 0.0) for index in range(peers - 1)],
        local=record("me", 1, 0, 1.0 / eta_s if eta_s != math.inf else 0.0),
        target_batch_size=1,
        now=NOW,
    )
    assert view.eta_s == pytest.approx(eta_s)
    assert announce_interval_s(view, ProgressSettings(target_batch_size=1)) == pytest.approx(expected_s)


async def test_gossip_reaches_peers_two_hops_away(make_tracker: MakeTracker) -> None:
    hub = GossipHub()
    a, b, c = [await make_tracker(hub, clock=Clock(NOW)) for _ in range(3)]
    hub.link(a.peer_id, b.peer_id)
    hub.link(b.peer_id, c.peer_id)
    a.report(epoch=1, samples_accumulated=64, samples_per_second=8.0, param_hash="cd" * 16)  # announced at once
    await eventually(lambda: a.peer_id in c.records(), "c hearing of a through b")
    assert c.records()[a.peer_id] == Progress(a.peer_id, 1, 64, 8.0, NOW, "cd" * 16)
    assert b.stats.forwarded >= 1
    assert c.stats.refused == {}


async def test_each_peer_gossips_what_its_links_moved_and_the_view_shows_it(make_tracker: MakeTracker) -> None:
    hub = GossipHub()
    a, b, c = [await make_tracker(hub, clock=Clock(NOW)) for _ in range(3)]
    hub.link(a.peer_id, b.peer_id)
    hub.link(b.peer_id, c.peer_id)
    # a's links carried 3 MB/s and 1 MB/s; b's links have not measured yet; c's links report junk.
    hub.peers[a.peer_id].throughputs = {b.peer_id: 3e6, c.peer_id: 1e6}
    hub.link(a.peer_id, c.peer_id)
    hub.peers[c.peer_id].throughputs = {a.peer_id: math.nan, b.peer_id: -5.0}
    for tracker in (a, b, c):
        tracker.report(epoch=1, samples_accumulated=8, samples_per_second=2.0)
    await eventually(lambda: all(len(t.records()) == 2 for t in (a, b, c)), "every tracker hearing the two others")
    expected = {a.peer_id: 3e6, b.peer_id: 0.0, c.peer_id: 0.0}  # the best link, not a sum over them
    assert {peer: record.link_throughput for peer, record in b.records().items()} == {
        peer: value for peer, value in expected.items() if peer != b.peer_id
    }
    assert a.view().link_throughputs == expected
    assert a.local.link_throughput == 3e6
    a.report(epoch=1, samples_accumulated=9, samples_per_second=2.0)  # a report keeps the last measurement
    assert a.local.link_throughput == 3e6


async def test_duplicates_are_dropped_and_not_forwarded_again(make_tracker: MakeTracker) -> None:
    hub = GossipHub()
    a, b, c = [await make_tracker(hub, clock=Clock(NOW)) for _ in range(3)]
    await eventually(lambda: all(t.stats.announced for t in (a, b, c)), "first announcements, to no neighbour yet")
    for x, y in ((a, b), (b, c), (a, c)):
        hub.link(x.peer_id, y.peer_id)
    a.report(epoch=1, samples_accumulated=1, samples_per_second=1.0)  # only a announces after the links exist
    await eventually(lambda: b.stats.duplicates + c.stats.duplicates == 2, "a's record reaching b and c twice")
    await asyncio.sleep(0.05)  # let anything still in flight arrive
    # b and c each got a's record from a and from each other; each passed the first copy on to the other only.
    for tracker in (b, c):
        assert (tracker.stats.accepted, tracker.stats.duplicates, tracker.stats.forwarded) == (1, 1, 1)
    assert b.records()[a.peer_id] == c.records()[a.peer_id]
    assert a.stats.accepted == a.stats.duplicates == 0  # nobody sends a record back to its author


async def test_the_hop_bound_stops_gossip(make_tracker: MakeTracker) -> None:
    hub = GossipHub()
    line = [await make_tracker(hub, clock=Clock(NOW), gossip_hops=2) for _ in range(4)]
    for x, y in itertools.pairwise(line):
        hub.link(x.peer_id, y.peer_id)
    first, last = line[0], line[3]
    first.report(epoch=2, samples_accumulated=1, samples_per_second=1.0)
    await eventually(lambda: first.peer_id in line[2].records(), "the record reaching the peer 2 links away")
    await eventually(lambda: line[2].stats.accepted >= 2, "the third peer hearing its other neighbour too")
    assert first.peer_id not in last.records()


async def linked_pair(make_tracker: MakeTracker, clock: Clock) -> tuple[ProgressTracker, ProgressTracker, GossipHub]:
    """Two trackers linked on a new hub, on one clock."""
    hub = GossipHub()
    a, b = await make_tracker(hub, clock=clock), await make_tracker(hub, clock=clock)
    hub.link(a.peer_id, b.peer_id)
    return a, b, hub


async def test_a_silent_peer_expires_from_the_view(make_tracker: MakeTracker) -> None:
    clock = Clock(NOW)
    a, b, _ = await linked_pair(make_tracker, clock)
    a.report(epoch=1, samples_accumulated=10, samples_per_second=1.0)
    b.report(epoch=1, samples_accumulated=10, samples_per_second=1.0)
    await eventually(lambda: a.peer_id in b.records(), "b hearing of a")
    assert b.view().peers == tuple(sorted((a.peer_id, b.peer_id)))
    await a.close()  # a stops announcing
    clock.now += b.settings.record_expiration_s + 1
    assert b.view().peers == (b.peer_id,)
    assert b.stats.expired == 1


async def test_stale_and_forged_records_from_a_neighbour_change_nothing(
    make_tracker: MakeTracker, make_member: Callable[..., Member]
) -> None:
    hub = GossipHub()
    b = await make_tracker(hub, clock=Clock(NOW))
    hostile = make_member()
    transport = hub.join(hostile.peer_id)
    hub.link(hostile.peer_id, b.peer_id)
    stale = sign_progress(
        hostile.identity, hostile.certificate, record(hostile.peer_id, 1, 5, 1.0, NOW - 61), run=RUN, ttl=1
    )
    forged = sign_progress(hostile.identity, hostile.certificate, record(hostile.peer_id, 1, 5, 1.0), run=RUN, ttl=1)
    forged["epoch"] = 99
    for bad in (stale, forged):
        transport.send_control(b.peer_id, bad)
    await eventually(lambda: sum(b.stats.refused.values()) == 2, "b refusing both records")
    assert b.stats.refused == {"stale": 1, "signature": 1}
    assert b.records() == {}


async def test_a_farewell_drops_its_author_from_every_view_at_once(make_tracker: MakeTracker) -> None:
    """A peer that left at a later epoch stops making the others believe they are behind, two hops away too,
    long before its record would expire; a record it sent before leaving cannot bring it back."""
    clock = Clock(NOW)
    hub = GossipHub()
    a, b, c = [await make_tracker(hub, clock=clock) for _ in range(3)]
    hub.link(a.peer_id, b.peer_id)
    hub.link(b.peer_id, c.peer_id)
    for tracker in (b, c):
        tracker.report(epoch=1, samples_accumulated=5, samples_per_second=1.0)
    a.report(epoch=2, samples_accumulated=0, samples_per_second=1.0)
    await eventually(lambda: a.peer_id in c.records() and b.peer_id in c.records(), "c hearing of a and b")
    await a.close()
    before_leaving = next(r for r in reversed(hub.peers[a.peer_id].sent) if r["type"] == "progress_v2")
    clock.now += 1
    assert a.farewell() == 1  # to its one neighbour, b, which passes it on to c
    await eventually(lambda: a.peer_id not in c.records() and a.peer_id not in b.records(), "a leaving both views")
    assert (b.stats.farewells, c.stats.farewells) == (1, 1)
    assert c.view().peers == tuple(sorted((b.peer_id, c.peer_id))) and not c.view().behind
    hub.peers[a.peer_id].send_control(b.peer_id, before_leaving)
    await eventually(lambda: b.stats.duplicates >= 1, "b dropping the record a sent before its farewell")
    assert a.peer_id not in b.records()


async def test_a_peer_that_returns_after_its_farewell_counts_again(make_tracker: MakeTracker) -> None:
    clock = Clock(NOW)
    a, b, _ = await linked_pair(make_tracker, clock)
    a.report(epoch=1, samples_accumulated=1, samples_per_second=1.0)
    await eventually(lambda: a.peer_id in b.records(), "b hearing of a")
    await a.close()
    a.farewell()
    await eventually(lambda: a.peer_id not in b.records(), "b dropping a")
    clock.now += 1
    await a.start()  # the same peer key joins again: its next record is newer than its farewell
    a.report(epoch=1, samples_accumulated=2, samples_per_second=1.0)
    await eventually(lambda: a.peer_id in b.records(), "b hearing of a again")


async def test_forged_and_stale_farewells_change_nothing(
    make_tracker: MakeTracker, make_member: Callable[..., Member]
) -> None:
    a, b, hub = await linked_pair(make_tracker, Clock(NOW))
    hostile = make_member()
    transport = hub.join(hostile.peer_id)
    hub.link(hostile.peer_id, b.peer_id)
    a.report(epoch=1, samples_accumulated=1, samples_per_second=1.0)
    await eventually(lambda: a.peer_id in b.records(), "b hearing of a")
    in_the_name_of_a = sign_farewell(hostile.identity, hostile.certificate, run=RUN, time=NOW + 1, ttl=0)
    in_the_name_of_a["peer_id"] = a.peer_id  # signed by the hostile key, with the hostile certificate
    tampered = sign_farewell(hostile.identity, hostile.certificate, run=RUN, time=NOW + 1, ttl=0)
    tampered["time"] = NOW + 2.0
    stale = sign_farewell(hostile.identity, hostile.certificate, run=RUN, time=NOW - 61, ttl=0)
    other_run = sign_farewell(hostile.identity, hostile.certificate, run="another-run", time=NOW + 1, ttl=0)
    for bad in (in_the_name_of_a, tampered, stale, other_run):
        transport.send_control(b.peer_id, bad)
    await eventually(lambda: sum(b.stats.refused.values()) == 4, "b refusing every farewell")
    assert b.stats.refused == {"certificate": 1, "signature": 2, "stale": 1}
    assert a.peer_id in b.records() and b.stats.farewells == 0


async def test_trackers_agree_when_the_target_is_reached(make_tracker: MakeTracker) -> None:
    clock = Clock(NOW)
    hub = GossipHub()
    peers = [await make_tracker(hub, clock=clock, target_batch_size=300) for _ in range(3)]
    for x, y in itertools.pairwise(peers):
        hub.link(x.peer_id, y.peer_id)
    for tracker in peers:
        tracker.report(epoch=1, samples_accumulated=80, samples_per_second=10.0)
    await eventually(lambda: all(t.view().num_peers == 3 for t in peers), "every tracker seeing all three")
    view = peers[0].view()
    assert (view.samples_accumulated, view.samples_per_second, view.ready) == (240, 30.0, False)
    assert view.eta_s == pytest.approx(2.0)
    clock.now += 2  # 20 samples more each, by their reported rates
    ready = [await tracker.wait_ready() for tracker in peers]
    assert all(view.ready and view.epoch == 1 and len(view.peers) == 3 for view in ready)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="target_batch_size"):
        ProgressSettings(target_batch_size=0)
    with pytest.raises(ValueError, match="record_expiration_s"):
        ProgressSettings(target_batch_size=1, max_announce_interval_s=60.0)
    with pytest.raises(ValueError, match="gossip_hops"):
        ProgressSettings(target_batch_size=1, gossip_hops=0)


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ({}, 0.0),  # no link has measured yet
        ({"b": 2e6, "c": 5e6}, 5e6),  # the best link
        ({"b": None, "c": math.inf, "d": -1.0, "e": True, "f": "fast", "g": 7.0}, 7.0),  # junk counts as nothing
    ],
)
def test_the_measured_throughput_is_the_best_sound_link_rate(rates: dict[str, object], expected: float) -> None:
    hub = GossipHub()
    transport = hub.join("a")
    for peer in ("b", "c", "d", "e", "f", "g"):
        hub.join(peer)
        hub.link("a", peer)
    transport.throughputs = rates  # type: ignore[assignment]  # junk on purpose
    assert measured_throughput(transport) == expected


def test_a_transport_without_links_measures_nothing() -> None:
    bare = SimpleNamespace(peer_id="a", neighbours=["b"])  # sends and hears records, holds no Links
    assert measured_throughput(bare) == 0.0  # type: ignore[arg-type]


async def test_matchmaking_waits_briefly_for_a_peer_one_epoch_behind(make_tracker: MakeTracker) -> None:
    """Two peers: a's round answer came first, so a is at epoch 2 while b's record still says 1. The view
    then ties and goes to epoch 2, whose peers are a alone; waiting for b's announcement avoids a lonely round."""
    a, b, _ = await linked_pair(make_tracker, Clock(NOW))
    a.report(epoch=1, samples_accumulated=0, samples_per_second=1.0)
    b.report(epoch=1, samples_accumulated=0, samples_per_second=1.0)
    await eventually(lambda: b.peer_id in a.records() and a.records()[b.peer_id].epoch == 1, "a hearing of b")
    a.report(epoch=2, samples_accumulated=0, samples_per_second=1.0)
    assert a.view().peers == (a.peer_id,), "the lonely view this wait exists for"
    waiting = asyncio.create_task(a.wait_for_round_peers(2, timeout_s=30.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    b.report(epoch=2, samples_accumulated=0, samples_per_second=1.0)  # announced at once
    view = await asyncio.wait_for(waiting, 10.0)
    assert view.epoch == 2 and view.peers == tuple(sorted((a.peer_id, b.peer_id)))


async def test_the_wait_for_a_peer_one_epoch_behind_is_bounded(make_tracker: MakeTracker) -> None:
    a, b, _ = await linked_pair(make_tracker, Clock(NOW))
    b.report(epoch=4, samples_accumulated=0, samples_per_second=1.0)
    await eventually(lambda: b.peer_id in a.records() and a.records()[b.peer_id].epoch == 4, "a hearing of b")
    a.report(epoch=5, samples_accumulated=0, samples_per_second=1.0)
    waiting = asyncio.create_task(a.wait_for_round_peers(5, timeout_s=0.5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    view = await asyncio.wait_for(waiting, 10.0)
    assert view.peers == (a.peer_id,)  # b stayed behind: matchmaking goes on without it
    assert (await a.wait_for_round_peers(7, timeout_s=30.0)).epoch == 5, "nobody one epoch behind 7: no wait"
