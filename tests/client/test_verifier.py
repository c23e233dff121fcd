"""CertificateVerifier: accepts what the server mints, refuses each way a certificate can be wrong or forged."""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivewire.errors import CertificateError
from hivewire.identity import (
    JWKS_MAX_AGE_S,
    MAX_CERTIFICATE_BYTES,
    MIN_REFETCH_INTERVAL_S,
    REQUIRED_CLAIMS,
    CertificateVerifier,
    PeerCertificate,
    peer_id_from_key,
)
from tests.client._fakes import RUN, SERVER, JWKSServer, SigningKey, raw_public


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server_key() -> SigningKey:
    return SigningKey()


@pytest.fixture
def jwks(server_key: SigningKey) -> JWKSServer:
    return JWKSServer(server_key)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(jwks: JWKSServer, clock: Clock) -> CertificateVerifier:
    return CertificateVerifier(SERVER, http=jwks.client(), monotonic=clock)


@pytest.fixture
def peer_key() -> bytes:
    return raw_public(Ed25519PrivateKey.generate())


def refused(verifier: CertificateVerifier, token: str, reason: str, run: str = RUN) -> None:
    with pytest.raises(CertificateError) as info:
        verifier.verify(token, run=run)
    assert reason in info.value.reason


def test_accepts_a_good_certificate(verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes) -> None:
    token = server_key.mint(peer_key)
    certificate = verifier.verify(token, run=RUN)
    assert isinstance(certificate, PeerCertificate)
    assert certificate.peer_key == peer_key
    assert certificate.peer_id == peer_id_from_key(peer_key)
    assert (certificate.user_id, certificate.run, certificate.issuer) == (42, RUN, SERVER)
    assert certificate.kid == server_key.kid
    assert certificate.token == token
    assert 3590 < certificate.expires_at.timestamp() - time.time() <= 3600


def test_issuer_spelling_is_normalized(jwks: JWKSServer, server_key: SigningKey, peer_key: bytes) -> None:
    verifier = CertificateVerifier("HTTP://Hive.test:8000/", http=jwks.client())
    assert verifier.verify(server_key.mint(peer_key, iss=SERVER + "/"), run=RUN).issuer == SERVER


def test_refuses_another_algorithm(verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes) -> None:
    # The classic confusion attack: HMAC keyed with the public key the verifier already trusts.
    secret = server_key.jwk["x"]
    headers = {"typ": "hivewire-peer+jwt", "kid": server_key.kid}
    token = jwt.encode(server_key.claims(peer_key), secret, algorithm="HS256", headers=headers)
    refused(verifier, token, "algorithm must be EdDSA")


def test_refuses_alg_none(verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes) -> None:
    headers = {"typ": "hivewire-peer+jwt", "kid": server_key.kid}
    token = jwt.encode(server_key.claims(peer_key), "", algorithm="none", headers=headers)
    refused(verifier, token, "algorithm must be EdDSA")


def test_refuses_a_wrong_type(verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes) -> None:
    refused(verifier, server_key.mint(peer_key, headers={"typ": "JWT"}), "type must be")


def test_refuses_an_expired_certificate(verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes) -> None:
    now = int(time.time())
    refused(verifier, server_key.mint(peer_key, iat=now - 4000, exp=now - 31), "expired")


def test_allows_30_seconds_of_clock_skew(
    verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes
) -> None:
    now = int(time.time())
    verifier.verify(server_key.mint(peer_key, iat=now - 3600, exp=now - 20), run=RUN)
    verifier.verify(server_key.mint(peer_key, iat=now + 20, exp=now + 3600), run=RUN)


def test_refuses_a_certificate_from_the_future(
    verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes
) -> None:
    now = int(time.time())
    with pytest.raises(CertificateError):
        verifier.verify(server_key.mint(peer_key, iat=now + 120, exp=now + 3600), run=RUN)


def test_refuses_another_issuer(verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes) -> None:
    refused(verifier, server_key.mint(peer_key, iss="http://evil.test"), "issued by http://evil.test")


def test_refuses_another_run(verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes) -> None:
    refused(verifier, server_key.mint(peer_key), "issued for run", run="other-run")


def test_refuses_a_peer_id_not_derived_from_the_key(
    verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes
) -> None:
    stolen = peer_id_from_key(raw_public(Ed25519PrivateKey.generate()))
    refused(verifier, server_key.mint(peer_key, peer_id=stolen), "peer_id is not derived from peer_key")


def test_refuses_an_oversized_token_before_parsing_it(verifier: CertificateVerifier, jwks: JWKSServer) -> None:
    refused(verifier, "a" * (MAX_CERTIFICATE_BYTES + 1), "at most")
    assert jwks.requests == 0


def test_refuses_a_tampered_signature(verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes) -> None:
    header, payload, signature = server_key.mint(peer_key).split(".")
    middle = len(signature) // 2
    flipped = signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1 :]
    refused(verifier, f"{header}.{payload}.{flipped}", "bad signature")


def test_refuses_a_tampered_payload(verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes) -> None:
    _, _, signature = server_key.mint(peer_key).split(".")
    forged_header, forged_payload, _ = server_key.mint(peer_key, sub="1").split(".")
    refused(verifier, f"{forged_header}.{forged_payload}.{signature}", "bad signature")


def test_refuses_another_key_claiming_the_servers_kid(
    verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes
) -> None:
    impostor = SigningKey()
    impostor.kid = server_key.kid
    refused(verifier, impostor.mint(peer_key), "bad signature")


@pytest.mark.parametrize("claim", REQUIRED_CLAIMS)
def test_refuses_a_missing_claim(
    verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes, claim: str
) -> None:
    refused(verifier, server_key.mint(peer_key, **{claim: None}), claim)


@pytest.mark.parametrize(
    ("claim", "value"),
    [("sub", 42), ("sub", "0"), ("run", ["tiny-lm"]), ("exp", float(time.time() + 600)), ("jti", "short")],
)
def test_refuses_an_ill_typed_claim(
    verifier: CertificateVerifier, server_key: SigningKey, peer_key: bytes, claim: str, value: Any
) -> None:
    with pytest.raises(CertificateError):
        verifier.verify(server_key.mint(peer_key, **{claim: value}), run=RUN)


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "é.é.é"])
def test_refuses_garbage(verifier: CertificateVerifier, token: str) -> None:
    with pytest.raises(CertificateError):
        verifier.verify(token, run=RUN)


def test_jwks_is_fetched_once_and_cached(
    verifier: CertificateVerifier, jwks: JWKSServer, server_key: SigningKey, peer_key: bytes
) -> None:
    for _ in range(3):
        verifier.verify(server_key.mint(peer_key), run=RUN)
    assert jwks.requests == 1


def test_unknown_kid_refetches_once_then_is_rate_limited(
    verifier: CertificateVerifier, jwks: JWKSServer, server_key: SigningKey, clock: Clock, peer_key: bytes
) -> None:
    verifier.verify(server_key.mint(peer_key), run=RUN)
    clock.now += MIN_REFETCH_INTERVAL_S
    bogus = [SigningKey() for _ in range(20)]
    refused(verifier, bogus[0].mint(peer_key), "unknown key")
    assert jwks.requests == 2
    for key in bogus:  # a flood of unknown kids within the interval costs the server nothing
        refused(verifier, key.mint(peer_key), "unknown key")
    assert jwks.requests == 2
    clock.now += MIN_REFETCH_INTERVAL_S
    refused(verifier, bogus[0].mint(peer_key), "unknown key")
    assert jwks.requests == 3


def test_a_rotated_key_is_learned_by_refetching(
    verifier: CertificateVerifier, jwks: JWKSServer, server_key: SigningKey, clock: Clock, peer_key: bytes
) -> None:
    verifier.verify(server_key.mint(peer_key), run=RUN)
    rotated = SigningKey()
    jwks.keys.append(rotated)
    clock.now += MIN_REFETCH_INTERVAL_S
    assert verifier.verify(rotated.mint(peer_key), run=RUN).kid == rotated.kid
    assert jwks.requests == 2


def test_a_withdrawn_key_stops_being_trusted_when_the_cache_ages(
    verifier: CertificateVerifier, jwks: JWKSServer, server_key: SigningKey, clock: Clock, peer_key: bytes
) -> None:
    verifier.verify(server_key.mint(peer_key), run=RUN)
    jwks.keys = [SigningKey()]
    clock.now += JWKS_MAX_AGE_S
    refused(verifier, server_key.mint(peer_key), "unknown key")


def test_cached_keys_keep_working_while_the_server_is_down(
    server_key: SigningKey, clock: Clock, peer_key: bytes
) -> None:
    up = True

    def handler(request: httpx.Request) -> httpx.Response:
        if not up:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"keys": [server_key.jwk]})

    verifier = CertificateVerifier(SERVER, http=httpx.Client(transport=httpx.MockTransport(handler)), monotonic=clock)
    verifier.verify(server_key.mint(peer_key), run=RUN)
    up = False
    clock.now += JWKS_MAX_AGE_S
    verifier.verify(server_key.mint(peer_key), run=RUN)
    refused(verifier, SigningKey().mint(peer_key), "keys are unavailable")


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(500, json={"detail": "boom"}),
        httpx.Response(200, content=b"<html>"),
        httpx.Response(200, json={"keys": "nope"}),
        httpx.Response(200, content=b'{"keys": [' + b" " * (70 * 1024) + b"]}"),
    ],
)
def test_a_bad_jwks_is_refused(response: httpx.Response, server_key: SigningKey, peer_key: bytes) -> None:
    client = httpx.Client(transport=httpx.MockTransport(lambda request: response))
    verifier = CertificateVerifier(SERVER, http=client)
    refused(verifier, server_key.mint(peer_key), "keys are unavailable")


def test_malformed_jwks_entries_are_skipped(server_key: SigningKey, peer_key: bytes) -> None:
    keys = [
        {"kty": "RSA", "kid": "rsa", "n": "x", "e": "AQAB"},
        {**server_key.jwk, "kid": "short-x", "x": "AAAA"},
        {**server_key.jwk, "kid": "hmac", "alg": "HS256"},
        "not a key",
        server_key.jwk,
    ]
    client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, json={"keys": keys})))
    verifier = CertificateVerifier(SERVER, http=client)
    verifier.verify(server_key.mint(peer_key), run=RUN)
    refused(verifier, server_key.mint(peer_key, headers={"kid": "hmac"}), "unknown key")
