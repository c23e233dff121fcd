"""Peer certificates: short-lived EdDSA JWTs binding a peer key to a user and a run (docs/protocol.md)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.core.keys import active_key, published_keys
from hivewire_server.core.timeutil import utcnow
from hivewire_server.errors import Unauthenticated

TOKEN_TYPE = "hivewire-peer+jwt"
LEEWAY_SECONDS = 30
REQUIRED_CLAIMS = ("iss", "sub", "run", "peer_id", "peer_key", "iat", "exp", "jti")


@dataclass(frozen=True)
class MintedCertificate:
    token: str
    jti: str
    expires_at: datetime


async def mint(
    session: AsyncSession,
    *,
    issuer: str,
    user_id: int,
    run: str,
    peer_id: str,
    peer_key: str,
    lifetime_seconds: int,
) -> MintedCertificate:
    key = await active_key(session)
    now = utcnow().replace(microsecond=0)
    expires_at = now + timedelta(seconds=lifetime_seconds)
    jti = secrets.token_urlsafe(16)
    claims = {
        "iss": issuer,
        "sub": str(user_id),
        "run": run,
        "peer_id": peer_id,
        "peer_key": peer_key,
        "iat": int(now.timestamp()),
        "exp": int(expires_at.timestamp()),
        "jti": jti,
    }
    token = jwt.encode(claims, key.private_key, algorithm="EdDSA", headers={"kid": key.kid, "typ": TOKEN_TYPE})
    return MintedCertificate(token=token, jti=jti, expires_at=expires_at)


async def verify_own(
    session: AsyncSession, token: str, *, issuer: str, lifetime_seconds: int, grace_seconds: int = 0
) -> dict[str, Any]:
    """Claims of a still-valid certificate this server signed; Unauthenticated otherwise.

    `grace_seconds` accepts a certificate that expired that long ago: round receipts are signed while their
    members' certificates were valid, but may be uploaded later."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthenticated("the certificate is not a JWT", code="bad_certificate") from exc
    keys = await published_keys(session, lifetime_seconds + grace_seconds)
    key = keys.get(str(header.get("kid")))
    if header.get("alg") != "EdDSA" or header.get("typ") != TOKEN_TYPE or key is None:
        raise Unauthenticated("the certificate was not issued by this server", code="bad_certificate")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=["EdDSA"],
            issuer=issuer,
            leeway=LEEWAY_SECONDS + grace_seconds,
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthenticated("the certificate has expired; join again", code="expired_certificate") from exc
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"the certificate is invalid: {exc}", code="bad_certificate") from exc
    return claims


def unix_to_datetime(value: int) -> datetime:
    return datetime.fromtimestamp(value, UTC)
