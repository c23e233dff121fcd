"""Test doubles at the transport edge: a signing key that mints certificates like the server, and its JWKS.

The server-minted path is covered by tests/contract/; here we need tokens we can break on purpose.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivewire.identity import encode_peer_key, peer_id_from_key

SERVER = "http://hive.test:8000"
RUN = "tiny-lm"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_public(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SigningKey:
    """An Ed25519 server key with an RFC 7638 kid, as server/core/keys.py makes them."""

    def __init__(self) -> None:
        self.private_key = Ed25519PrivateKey.generate()
        x = b64url(raw_public(self.private_key))
        canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, sort_keys=True, separators=(",", ":"))
        self.kid = b64url(hashlib.sha256(canonical.encode()).digest())
        self.jwk = {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "alg": "EdDSA", "use": "sig"}

    def claims(self, peer_key_raw: bytes, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": SERVER,
            "sub": "42",
            "run": RUN,
            "peer_id": peer_id_from_key(peer_key_raw),
            "peer_key": encode_peer_key(peer_key_raw),
            "iat": now,
            "exp": now + 3600,
            "jti": secrets.token_urlsafe(16),
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def mint(self, peer_key_raw: bytes, *, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
        """A certificate for `peer_key_raw`; a claim overridden with None is left out."""
        header = {"typ": "hivewire-peer+jwt", "kid": self.kid, **(headers or {})}
        return jwt.encode(self.claims(peer_key_raw, **overrides), self.private_key, algorithm="EdDSA", headers=header)


class JWKSServer:
    """Answers /.well-known/jwks.json with the current keys and counts the requests."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.requests = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/.well-known/jwks.json"
        self.requests += 1
        return httpx.Response(200, json={"keys": [key.jwk for key in self.keys]})

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self))
