"""Fixtures for coordination tests: volunteers with certificates from a local "server" key, loopback only.

Certificates are minted by a local Ed25519 key and checked against its JWKS served through an httpx
MockTransport (tests/client/_fakes.py). The aiortc tests gather host candidates on 127.0.0.1 alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivewire.identity import CertificateVerifier, PeerIdentity
from hivewire.mesh import restrict_host_addresses
from tests.client._fakes import SERVER, JWKSServer, SigningKey, raw_public
from tests.client.coordination._support import Member

LOOPBACK = "127.0.0.1"


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
def jwks(server_key: SigningKey) -> JWKSServer:
    return JWKSServer(server_key)


@pytest.fixture
def cert_verifier(jwks: JWKSServer) -> Iterator[CertificateVerifier]:
    http = jwks.client()
    yield CertificateVerifier(SERVER, http=http)
    http.close()


@pytest.fixture
def make_member(server_key: SigningKey) -> Callable[..., Member]:
    """A new volunteer of the run; claims given are overridden in its certificate (None leaves one out)."""

    def make(**claims: Any) -> Member:
        private_key = Ed25519PrivateKey.generate()
        identity = PeerIdentity(private_key=private_key, public_key_raw=raw_public(private_key))
        return Member(identity, server_key.mint(identity.public_key_raw, **claims))

    return make
