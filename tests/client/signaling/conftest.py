"""Fixtures for signaling tests: certificates from a local "server" key, real aiortc SDP, loopback only.

Certificates are minted by a local Ed25519 key and checked against its JWKS served through an httpx
MockTransport (tests/client/_fakes.py); the real server's certificates are covered by test_against_server.py.
No packet may leave loopback: host candidates are restricted to 127.0.0.1 for the whole session, and every
SDP a test applies is checked to carry no other address first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivewire.identity import CertificateVerifier, PeerIdentity
from hivewire.mesh import restrict_host_addresses
from tests.client._fakes import SERVER, JWKSServer, SigningKey, raw_public
from tests.client.signaling._support import LOOPBACK, Member, assert_loopback_only, new_pc


@pytest.fixture(autouse=True, scope="session")
def _loopback_only() -> Iterator[None]:
    """Gather host candidates on 127.0.0.1 alone (aioice would otherwise use every other address)."""
    restrict_host_addresses([LOOPBACK])
    yield
    restrict_host_addresses(None)


@pytest.fixture
def server_key() -> SigningKey:
    return SigningKey()


@pytest.fixture
def cert_verifier(server_key: SigningKey) -> Iterator[CertificateVerifier]:
    http = JWKSServer(server_key).client()
    yield CertificateVerifier(SERVER, http=http)
    http.close()


@pytest.fixture
def make_member(server_key: SigningKey) -> Callable[..., Member]:
    """A new volunteer of the run; claims given are overridden in its certificate (None leaves one out)."""

    def make(**claims: object) -> Member:
        private_key = Ed25519PrivateKey.generate()
        identity = PeerIdentity(private_key=private_key, public_key_raw=raw_public(private_key))
        return Member(identity, server_key.mint(identity.public_key_raw, **claims))

    return make


@pytest.fixture
async def offer_sdp() -> AsyncIterator[str]:
    """The SDP of a real aiortc offer with a data channel, candidates gathered on loopback."""
    pc = new_pc()
    pc.createDataChannel("test")
    await pc.setLocalDescription(await pc.createOffer())
    assert pc.localDescription is not None
    yield assert_loopback_only(pc.localDescription.sdp)
    await pc.close()
