"""Peers of one run meshing through the real server (a uvicorn process on loopback, SQLite), and back.

No packet may leave loopback: host candidates are restricted to 127.0.0.1 for the whole session, and the
ICE server list is ``[]`` (the server is started without STUN or TURN, and the mesh gets ``[]`` anyway).
Each peer has its own user and API token, joins over HTTP for a real certificate, and runs a Mesh with
the real SignalingClient and DescriptionVerifier.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace

import aioice.ice
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivewire.api import HivewireAPI, JoinResponse
from hivewire.identity import CertificateVerifier, PeerIdentity
from hivewire.mesh import LinkSettings, restrict_host_addresses
from hivewire.mesh.manager import Mesh, MeshSettings
from hivewire.mesh.neighbours import Backoff
from hivewire.signaling import DescriptionVerifier, SignalingClient, SignalingSettings
from hivewire.signaling import client as signaling_client
from tests.client.live_server import Server
from tests.conftest import RUN, Account, new_user
from tests.support import LOOPBACK

SLUG = str(RUN["slug"])
WAIT_TIMEOUT_S = 20.0  # bound on every wait for the mesh to reach a state; it normally takes a second or two

TEST_MESH = MeshSettings(
    answer_timeout_s=10.0,
    maintain_interval_s=0.5,
    gossip_interval_s=1.0,
    backoff=Backoff(base_s=0.3, max_s=2.0),
    link=LinkSettings(open_timeout_s=10.0),
)
# A peer that takes one link and declines every other offer.
ONE_LINK = replace(TEST_MESH, max_neighbours=1, max_links=1)
TEST_SIGNALING = SignalingSettings(
    backoff=signaling_client.Backoff(initial_s=0.2, max_s=1.0), request_timeout_s=5.0, start_timeout_s=10.0
)


@pytest.fixture(autouse=True, scope="session")
def _loopback_only() -> Iterator[None]:
    """Gather host candidates on 127.0.0.1 alone (aioice would otherwise use every other address)."""
    restrict_host_addresses([LOOPBACK])
    assert aioice.ice.get_host_addresses(True, True) == [LOOPBACK]
    yield
    restrict_host_addresses(None)


@pytest.fixture
def organizer(http: httpx.Client) -> Account:
    """The first user (an organizer), who creates the run."""
    user = new_user(http, "olivia")  # type: ignore[arg-type]  # httpx.Client has the TestClient calls used
    response = http.post("/api/runs", json=RUN, headers=user.headers)
    assert response.status_code == 201, response.text
    return user


@dataclass
class Peer:
    """One volunteer: key, join response, and its mesh."""

    name: str
    identity: PeerIdentity
    joined: JoinResponse
    mesh: Mesh

    @property
    def id(self) -> str:
        return self.identity.peer_id


Spawn = Callable[..., Awaitable[Peer]]  # spawn(name, settings=TEST_MESH) -> a started peer


def new_identity() -> PeerIdentity:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PeerIdentity(private_key=key, public_key_raw=raw)


def join(server: Server, user: Account, identity: PeerIdentity, slug: str = SLUG) -> JoinResponse:
    with HivewireAPI(server.url, user.token) as api:
        return api.join(slug, identity.peer_key)


@pytest.fixture
async def spawn(server: Server, http: httpx.Client, organizer: Account) -> AsyncIterator[Spawn]:
    """Factory: a new user joins the run with a new key and starts a mesh; all are closed at teardown."""
    peers: list[Peer] = []
    verifiers: list[CertificateVerifier] = []

    async def make(name: str, settings: MeshSettings = TEST_MESH) -> Peer:
        user = new_user(http, name)  # type: ignore[arg-type]
        identity = new_identity()
        joined = join(server, user, identity)
        assert joined.ice_servers == [], "the test server must hand out no STUN/TURN: nothing may leave loopback"
        certificates = CertificateVerifier(server.url)
        verifiers.append(certificates)
        mesh = Mesh(
            identity,
            lambda: joined.certificate,
            DescriptionVerifier(certificates, run=SLUG, self_peer_id=identity.peer_id),
            ice_servers=[],
            signaling=SignalingClient(joined.signaling_url, lambda: joined.certificate, settings=TEST_SIGNALING),
            settings=settings,
        )
        peer = Peer(name, identity, joined, mesh)
        peers.append(peer)
        await mesh.start(joined.initial_peers)
        return peer

    yield make
    await asyncio.gather(*(peer.mesh.close() for peer in peers))
    for verifier in verifiers:
        verifier.close()


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_full_mesh(peers: list[Peer]) -> None:
    for peer in peers:

        def linked_to_all(peer: Peer = peer) -> bool:
            return {other.id for other in peers if other is not peer} <= set(peer.mesh.neighbours)

        await wait_until(linked_to_all, f"{peer.name} to link to every other peer")
