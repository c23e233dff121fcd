"""The direct TLS path end to end, with the real server and signed signaling: two meshes that can reach each
other on loopback move bulk payloads over it, and a peer that turned it off still links and moves payloads
over WebRTC with one that has it on."""

import asyncio
import hashlib
import os
from dataclasses import replace

from hivewire.mesh import DirectSettings
from hivewire.mesh.direct import PATH_DIRECT, PATH_WEBRTC
from tests.client.mesh_e2e.conftest import TEST_MESH, Peer, Spawn, wait_full_mesh, wait_until

TRANSFER_TIMEOUT_S = 60.0
DIRECT_OFF = replace(TEST_MESH, direct=DirectSettings(enabled=False))


async def move(sender: Peer, receiver: Peer, payload: bytes) -> bytes:
    """Send ``payload`` from sender to receiver over their link; the SHA-256 of what arrived."""
    out, into = sender.mesh.link(receiver.id), receiver.mesh.link(sender.id)
    assert out is not None and into is not None, f"{sender.name} and {receiver.name} are not linked"
    async with asyncio.timeout(TRANSFER_TIMEOUT_S):
        _, (_, data) = await asyncio.gather(out.send_payload(payload), into.recv_payload())
    return hashlib.sha256(data).digest()


def path(peer: Peer, other: Peer) -> str | None:
    link = peer.mesh.link(other.id)
    return link.path if link is not None else None


async def test_two_meshes_move_payloads_over_the_direct_path(spawn: Spawn) -> None:
    ada, bob = await spawn("ada"), await spawn("bob")
    await wait_full_mesh([ada, bob])
    assert ada.mesh.direct is not None and ada.mesh.direct.addresses, "the mesh listens on loopback"
    await wait_until(lambda: path(ada, bob) == path(bob, ada) == PATH_DIRECT, "the direct path between them")
    payload = os.urandom(5 * 2**20)
    assert await move(ada, bob, payload) == hashlib.sha256(payload).digest()
    assert await move(bob, ada, payload[:999]) == hashlib.sha256(payload[:999]).digest()
    link = ada.mesh.link(bob.id)
    assert link is not None and link.stats.payloads_sent_direct == 1


async def test_a_peer_with_the_direct_path_off_interoperates(spawn: Spawn) -> None:
    ada, bob = await spawn("ada"), await spawn("bob", DIRECT_OFF)
    await wait_full_mesh([ada, bob])
    assert bob.mesh.direct is None
    payload = os.urandom(2**20)
    assert await move(ada, bob, payload) == hashlib.sha256(payload).digest()
    assert await move(bob, ada, payload) == hashlib.sha256(payload).digest()
    assert path(ada, bob) == path(bob, ada) == PATH_WEBRTC
    link = bob.mesh.link(ada.id)
    assert link is not None and link.stats.records_refused == 0
