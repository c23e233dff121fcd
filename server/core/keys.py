"""The server's Ed25519 certificate-signing keys: created on first start, kept in the database (so replicas
share them), published as a JWKS with RFC 7638 thumbprints as `kid`, rotated without breaking live certs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.core.security import b64url_encode
from hivewire_server.core.timeutil import utcnow
from hivewire_server.models import SigningKey


@dataclass(frozen=True)
class ActiveKey:
    kid: str
    private_key: Ed25519PrivateKey


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace."""
    required = {name: jwk[name] for name in ("crv", "kty", "x")}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"))
    return b64url_encode(hashlib.sha256(canonical.encode()).digest())


def _load(row: SigningKey) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(row.private_key_pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key {row.kid} is not Ed25519")
    return key


async def _create(session: AsyncSession) -> SigningKey:
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    row = SigningKey(kid=thumbprint(public_jwk(private_key.public_key())), private_key_pem=pem)
    session.add(row)
    await session.flush()
    return row


async def active_key(session: AsyncSession) -> ActiveKey:
    """The newest unretired key, created if there is none (first start)."""
    row = await session.scalar(
        select(SigningKey).where(SigningKey.retired_at.is_(None)).order_by(SigningKey.created_at.desc())
    )
    if row is None:
        row = await _create(session)
        await session.commit()
    return ActiveKey(kid=row.kid, private_key=_load(row))


async def rotate(session: AsyncSession) -> str:
    """Retire every current key and create a new one; returns the new kid."""
    for row in await session.scalars(select(SigningKey).where(SigningKey.retired_at.is_(None))):
        row.retired_at = utcnow()
    row = await _create(session)
    await session.commit()
    return row.kid


async def published_keys(session: AsyncSession, certificate_lifetime_seconds: int) -> dict[str, Ed25519PublicKey]:
    """Keys that may still have signed a valid certificate: unretired, or retired within one lifetime."""
    horizon = utcnow() - timedelta(seconds=certificate_lifetime_seconds + 60)
    rows = await session.scalars(
        select(SigningKey).where((SigningKey.retired_at.is_(None)) | (SigningKey.retired_at > horizon))
    )
    return {row.kid: _load(row).public_key() for row in rows}


def jwks(keys: dict[str, Ed25519PublicKey]) -> dict[str, list[dict[str, str]]]:
    return {"keys": [{**public_jwk(key), "kid": kid, "alg": "EdDSA", "use": "sig"} for kid, key in keys.items()]}
