"""The mesh end to end, with the real server: links form through signed signaling, survive the server going
away, form anew through a shared neighbour while it is away, and refuse forged offers that a relay carries."""

import asyncio
import hashlib
import os
import time

import httpx
import pytest
from aiortc import RTCPeerConnection

from hivewire.mesh import Link, MeshError, build_configuration
from hivewire.signaling import sign_description
from tests.client.mesh_e2e.conftest import ONE_LINK, Peer, Server, Spawn, join, wait_full_mesh, wait_until
from tests.conftest import RUN, Account

TRANSFER_TIMEOUT_S = 60.0  # bound on a transfer; 20 MB takes a few seconds at aiortc's in-process speed
CONNECT_TIMEOUT_S = 20.0  # bound on connect(); it normally takes well under a second on loopback


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


async def move(sender: Peer, receiver: Peer, payload: bytes) -> str:
    """Send ``payload`` over the link between the two peers; the digest of what arrived."""
    out, into = sender.mesh.link(receiver.id), receiver.mesh.link(sender.id)
    assert out is not None and into is not None, f"{sender.name} and {receiver.name} are not linked"
    async with asyncio.timeout(TRANSFER_TIMEOUT_S):
        _, (_, data) = await asyncio.gather(out.send_payload(payload), into.recv_payload())
    return sha256(data)


def links_of(peer: Peer) -> dict[str, Link | None]:
    return {neighbour: peer.mesh.link(neighbour) for neighbour in peer.mesh.neighbours}


async def three_peers(spawn: Spawn) -> list[Peer]:
    peers = [await spawn(name) for name in ("ada", "bob", "cyd")]
    await wait_full_mesh(peers)
    return peers


@pytest.mark.slow
async def test_three_peers_mesh_through_the_server_and_move_20_mb_intact(spawn: Spawn) -> None:
    peers = await three_peers(spawn)
    ada, bob, cyd = peers
    big, small = os.urandom(20 * 2**20), os.urandom(2**20)
    digests = await asyncio.gather(move(ada, bob, big), move(bob, cyd, small), move(cyd, ada, small))
    assert digests == [sha256(big), sha256(small), sha256(small)]
    for peer in peers:
        assert peer.mesh.stats.signals_refused == 0
        assert peer.mesh.stats.signals_sent["server"] >= 1, "links formed through the server"


@pytest.mark.slow
async def test_with_the_server_stopped_a_new_link_forms_through_a_shared_neighbour(
    server: Server, spawn: Spawn
) -> None:
    ada, bob, cyd = await three_peers(spawn)
    await wait_until(lambda: ada.mesh.table.relays_for(cyd.id, [bob.id]) == [bob.id], "bob to tell ada it links to cyd")
    server.stop()
    await wait_until(lambda: not ada.mesh.signaling_connected, "ada to notice the server is gone")
    await ada.mesh.disconnect(cyd.id)
    sent_via_server = ada.mesh.stats.signals_sent["server"]

    link = await asyncio.wait_for(ada.mesh.connect(cyd.id), CONNECT_TIMEOUT_S)

    assert isinstance(link, Link) and cyd.id in ada.mesh.neighbours
    await wait_until(lambda: ada.id in cyd.mesh.neighbours, "cyd to hold the new link too")
    assert ada.mesh.stats.signals_sent["server"] == sent_via_server
    assert bob.mesh.relay.forwarded >= 1, "the offer and answer crossed bob"
    payload = os.urandom(2**20)
    assert await move(ada, cyd, payload) == sha256(payload)
    assert await move(cyd, ada, payload) == sha256(payload)


@pytest.mark.slow
async def test_links_survive_a_server_restart_and_signaling_reconnects(server: Server, spawn: Spawn) -> None:
    ada, bob, cyd = peers = await three_peers(spawn)
    links = {peer.name: links_of(peer) for peer in peers}
    payload = os.urandom(2**20)

    server.stop()
    await wait_until(lambda: not any(peer.mesh.signaling_connected for peer in peers), "every peer to see it go")
    assert await move(ada, bob, payload) == sha256(payload)

    server.start()
    await wait_until(lambda: all(peer.mesh.signaling_connected for peer in peers), "every peer to reconnect")
    assert await move(bob, cyd, payload) == sha256(payload)
    assert {peer.name: links_of(peer) for peer in peers} == links, "no link was lost or replaced"

    await ada.mesh.disconnect(cyd.id)
    sent_via_server = ada.mesh.stats.signals_sent["server"]
    await asyncio.wait_for(ada.mesh.connect(cyd.id), CONNECT_TIMEOUT_S)
    assert ada.mesh.stats.signals_sent["server"] > sent_via_server, "the new offer went through the server"
    assert await move(cyd, ada, payload) == sha256(payload)


@pytest.fixture
def other_run(http: httpx.Client, organizer: Account) -> str:
    """A second run of the same server."""
    response = http.post("/api/runs", json={**RUN, "slug": "other-run", "name": "Other run"}, headers=organizer.headers)
    assert response.status_code == 201, response.text
    return "other-run"


@pytest.mark.slow
async def test_forged_offers_through_a_relay_are_refused(
    server: Server, organizer: Account, other_run: str, spawn: Spawn
) -> None:
    ada, bob, cyd = await three_peers(spawn)
    ada_link_at_cyd = cyd.mesh.link(ada.id)
    opened = cyd.mesh.stats.links_opened
    # ada's own key, with a certificate that is genuine but for another run
    other_run_certificate = join(server, organizer, ada.identity, slug=other_run).certificate

    sdp = await fresh_offer_sdp()
    tampered = sign_description(
        ada.identity, ada.joined.certificate, sender=ada.id, receiver=cyd.id, kind="offer", sdp=sdp, now=time.time()
    )
    tampered["sdp"] = flip_fingerprint(sdp)
    for_other_run = sign_description(
        ada.identity, other_run_certificate, sender=ada.id, receiver=cyd.id, kind="offer", sdp=sdp, now=time.time()
    )
    for payload in (tampered, for_other_run):
        # ada hands the offer to bob as a relay record; bob forwards it to cyd, naming ada as its sender.
        relay = {"type": "relay", "to": cyd.id, "from": ada.id, "kind": "offer", "payload": payload, "ttl": 2}
        to_bob = ada.mesh.link(bob.id)
        assert to_bob is not None
        to_bob.send_control(relay)

    await wait_until(lambda: cyd.mesh.stats.signals_refused == 2, "cyd to refuse both forged offers")
    assert cyd.mesh.link(ada.id) is ada_link_at_cyd, "the genuine link was not replaced"
    assert cyd.mesh.stats.links_opened == opened
    assert bob.mesh.relay.forwarded >= 2


async def fresh_offer_sdp() -> str:
    """A real offer SDP (loopback candidates only) with the link's channels, as a forger would start."""
    pc = RTCPeerConnection(build_configuration([]))
    try:
        pc.createDataChannel("hivewire-control", negotiated=True, id=0)
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


def flip_fingerprint(sdp: str) -> str:
    """The SDP with the first hex digit of its DTLS fingerprint changed: a relay swapping in its own key."""
    marker = "a=fingerprint:sha-256 "
    at = sdp.index(marker) + len(marker)
    return sdp[:at] + ("0" if sdp[at] != "0" else "1") + sdp[at + 1 :]


@pytest.mark.slow
async def test_a_dead_neighbour_is_dropped_and_a_newcomer_takes_its_place(spawn: Spawn) -> None:
    ada, bob, cyd = await three_peers(spawn)
    await bob.mesh.close()  # bob's process goes away: its channels close under ada and cyd

    await wait_until(lambda: bob.id not in ada.mesh.neighbours + cyd.mesh.neighbours, "ada and cyd to drop bob")
    assert ada.mesh.stats.links_lost >= 1 and cyd.mesh.stats.links_lost >= 1
    await wait_until(lambda: bob.id not in ada.mesh.table.known(), "the server to report bob gone")

    dan = await spawn("dan")
    await wait_full_mesh([ada, cyd, dan])
    payload = os.urandom(2**20)
    assert await move(dan, ada, payload) == sha256(payload)


@pytest.mark.slow
async def test_a_full_peer_declines_further_offers(spawn: Spawn) -> None:
    ada = await spawn("ada", ONE_LINK)
    bob = await spawn("bob")
    await wait_until(lambda: ada.mesh.neighbours == [bob.id], "ada to take its one link")
    cyd = await spawn("cyd")

    await wait_until(lambda: ada.mesh.stats.offers_declined >= 1, "ada to decline cyd's offer")
    assert ada.mesh.neighbours == [bob.id]
    await wait_full_mesh([bob, cyd])
    with pytest.raises(MeshError, match="max_links=1"):
        await ada.mesh.connect(cyd.id)
