"""The mesh's rules without a network: glare, candidate choice and backoff, relay records and forwarding."""

import random
from typing import Any

import pytest

from hivewire.mesh import ControlCodec, ControlRecordError
from hivewire.mesh.neighbours import Backoff, NeighbourTable, our_offer_wins
from hivewire.mesh.paths import NoSignalingPath, Signal
from hivewire.mesh.relay import MESH_SCHEMAS, RELAY_BURST, RelayPath

ME, ALICE, BOB, CAROL = ("p" + letter * 24 for letter in "mabc")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def table(clock: Clock) -> NeighbourTable:
    return NeighbourTable(ME, backoff=Backoff(base_s=1.0, max_s=8.0, jitter=0.0), clock=clock, rng=random.Random(1))


def test_glare_keeps_exactly_one_offer() -> None:
    assert our_offer_wins(ALICE, BOB) is True
    assert our_offer_wins(BOB, ALICE) is False


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(base_s=1.0, max_s=8.0, jitter=0.0)
    assert [backoff.delay_s(n, random.Random()) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0]


def test_candidates_skip_self_malformed_busy_and_backing_off_peers() -> None:
    clock = Clock()
    peers = table(clock)
    assert peers.add([ME, ALICE, BOB, CAROL, ALICE, "not-a-peer-id"]) == 3
    assert sorted(peers.next_candidates(busy={BOB}, room=8)) == [ALICE, CAROL]
    assert peers.next_candidates(busy=set(), room=0) == []
    assert len(peers.next_candidates(busy=set(), room=2)) == 2

    assert peers.failed(ALICE) == 1.0
    assert sorted(peers.next_candidates(busy=set(), room=8)) == [BOB, CAROL]
    assert peers.next_retry_in_s(busy=set()) == 1.0
    clock.now += 1.0
    assert peers.next_candidates(busy=set(), room=3)[-1] == ALICE, "peers that never failed come first"
    assert peers.failed(ALICE) == 2.0, "the second failure waits twice as long"
    peers.succeeded(ALICE)
    assert ALICE in peers.next_candidates(busy=set(), room=8)

    peers.remove(CAROL)
    assert peers.failed(CAROL) == 0.0
    assert CAROL not in peers.known(), "a peer that left is not brought back by its last failure"


def test_gossiped_neighbours_become_candidates_and_relays() -> None:
    peers = table(Clock())
    peers.set_their_neighbours(ALICE, [BOB, ME, ALICE, "junk"])
    assert peers.known() == {BOB}, "gossip teaches new peers, never ourselves"
    assert peers.relays_for(BOB, linked=[ALICE]) == [ALICE]
    assert peers.relays_for(BOB, linked=[]) == [], "only linked neighbours can relay"
    peers.forget_neighbour(ALICE)
    assert peers.relays_for(BOB, linked=[ALICE]) == []


def relay_record(**changes: Any) -> dict[str, Any]:
    return {"type": "relay", "to": BOB, "from": ALICE, "kind": "offer", "payload": {"sdp": "v=0"}, "ttl": 2} | changes


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": 99}, "ttl"),
        ({"to": "p-short"}, "to"),
        ({"from": ALICE.upper()}, "from"),
        ({"kind": "hello"}, "kind"),
        ({"payload": {"sdp": b"bytes are not JSON"}}, "payload"),
        ({"payload": ["not", "an", "object"]}, "payload"),
    ],
)
def test_malformed_relay_records_are_refused(changes: dict[str, Any], why: str) -> None:
    codec = ControlCodec(MESH_SCHEMAS)
    assert codec.decode(codec.encode(relay_record())) == relay_record()
    with pytest.raises(ControlRecordError, match=why):
        codec.validate(relay_record(**changes))


def test_neighbour_lists_are_bounded_and_checked() -> None:
    codec = ControlCodec(MESH_SCHEMAS)
    codec.validate({"type": "neighbours", "peers": [ALICE, BOB]})
    with pytest.raises(ControlRecordError, match="at most"):
        codec.validate({"type": "neighbours", "peers": [ALICE] * 65})
    with pytest.raises(ControlRecordError, match="peer id"):
        codec.validate({"type": "neighbours", "peers": ["nope"]})


class RecordingLink:
    """Stands in for a Link at the one call the relay makes: send_control."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.sent: list[dict[str, Any]] = []

    def send_control(self, record: dict[str, Any]) -> None:
        self.sent.append(record)


def relay_path(links: dict[str, RecordingLink], delivered: list[Signal], clock: Clock) -> RelayPath:
    return RelayPath(ME, links=lambda: links, table=table(clock), deliver=delivered.append, clock=clock)  # type: ignore[arg-type,return-value]


def test_a_relay_names_the_neighbour_it_heard_from_and_spends_one_hop() -> None:
    links = {ALICE: RecordingLink(ALICE), BOB: RecordingLink(BOB)}
    delivered: list[Signal] = []
    relay = relay_path(links, delivered, Clock())

    relay.on_record(ALICE, relay_record(**{"from": CAROL}))  # alice claims to forward for carol
    assert links[BOB].sent == [relay_record(ttl=1)], "from is alice, whatever alice wrote"

    relay.on_record(ALICE, relay_record(ttl=1))
    relay.on_record(ALICE, relay_record(to=CAROL))
    assert len(links[BOB].sent) == 1 and relay.dropped == 2, "no hop left; carol is not our neighbour"

    relay.on_record(BOB, relay_record(to=ME, **{"from": CAROL}, ttl=1))
    assert delivered == [Signal(sender=CAROL, kind="offer", payload={"sdp": "v=0"}, via=BOB)]


async def test_a_reply_goes_back_through_the_neighbour_that_relayed_the_signal() -> None:
    links = {ALICE: RecordingLink(ALICE), BOB: RecordingLink(BOB)}
    relay = relay_path(links, [], Clock())
    with pytest.raises(NoSignalingPath, match="no neighbour"):
        await relay.send_signal(CAROL, "answer", {})

    relay.on_record(BOB, relay_record(to=ME, **{"from": CAROL}, ttl=1))
    await relay.send_signal(CAROL, "answer", {"sdp": "v=0"})
    assert links[BOB].sent == [relay_record(to=CAROL, **{"from": ME}, kind="answer")]
    relay.forget(BOB)
    with pytest.raises(NoSignalingPath):
        await relay.send_signal(CAROL, "answer", {})


def test_relaying_for_one_neighbour_is_rate_limited() -> None:
    links = {ALICE: RecordingLink(ALICE), BOB: RecordingLink(BOB)}
    clock = Clock()
    relay = relay_path(links, [], clock)
    for _ in range(RELAY_BURST + 5):
        relay.on_record(ALICE, relay_record())
    assert (relay.forwarded, relay.dropped) == (RELAY_BURST, 5)
    clock.now += 1.0
    relay.on_record(ALICE, relay_record())
    assert relay.forwarded == RELAY_BURST + 1
