"""Join and renew: admit a user's peer key to a run and hand it a certificate and TURN credentials.
Which peers are live is the signaling hub's knowledge, so the route adds `initial_peers`."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server import certificates
from hivewire_server.core.config import Settings
from hivewire_server.core.security import b64url_decode, peer_id_from_key
from hivewire_server.core.timeutil import utcnow
from hivewire_server.errors import Conflict, Forbidden, InvalidInput, Unauthenticated
from hivewire_server.models import Peer, Run, User
from hivewire_server.runs import admit, check_capacity
from hivewire_server.schemas import JoinResponse, RunSpec
from hivewire_server.turn import ice_servers


def parse_peer_key(peer_key: str) -> bytes:
    try:
        raw = b64url_decode(peer_key)
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidInput("peer_key must be a base64url Ed25519 public key (32 bytes)", code="bad_peer_key") from exc
    return raw


def signaling_url(settings: Settings, slug: str) -> str:
    base = settings.base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return f"{base}/api/runs/{slug}/signal"


async def _issue(session: AsyncSession, *, settings: Settings, run: Run, user: User, peer: Peer) -> JoinResponse:
    minted = await certificates.mint(
        session,
        issuer=settings.base_url,
        user_id=user.id,
        run=run.slug,
        peer_id=peer.peer_id,
        peer_key=peer.peer_key,
        lifetime_seconds=settings.certificate_lifetime_seconds,
    )
    peer.certificate_jti = minted.jti
    peer.certificate_expires_at = minted.expires_at
    peer.last_seen_at = utcnow()
    await session.commit()
    return JoinResponse(
        peer_id=peer.peer_id,
        certificate=minted.token,
        certificate_expires_at=minted.expires_at,
        ice_servers=ice_servers(
            stun_urls=settings.stun_urls,
            turn_urls=settings.turn_urls,
            secret=settings.turn_secret.get_secret_value(),
            user_id=user.id,
            expires_at_unix=int(minted.expires_at.timestamp()),
        ),
        run=RunSpec.model_validate(run),
        initial_peers=[],  # filled by the API layer from the signaling hub: live means connected
        signaling_url=signaling_url(settings, run.slug),
    )


async def join(session: AsyncSession, *, settings: Settings, run: Run, user: User, peer_key: str) -> JoinResponse:
    peer_id = peer_id_from_key(parse_peer_key(peer_key))
    await admit(session, run=run, user=user)
    await check_capacity(session, run=run, peer_id=peer_id, live_seconds=settings.peer_live_seconds)
    peer = await session.scalar(select(Peer).where(Peer.run_id == run.id, Peer.peer_id == peer_id))
    if peer is None:
        peer = Peer(
            run_id=run.id,
            user_id=user.id,
            peer_id=peer_id,
            peer_key=peer_key,
            certificate_jti="",
            certificate_expires_at=utcnow(),
        )
        session.add(peer)
    elif peer.user_id != user.id:
        raise Conflict("this peer key belongs to another user; let the client make a new key", code="peer_key_taken")
    return await _issue(session, settings=settings, run=run, user=user, peer=peer)


async def renew(session: AsyncSession, *, settings: Settings, run: Run, user: User, certificate: str) -> JoinResponse:
    claims = await certificates.verify_own(
        session, certificate, issuer=settings.base_url, lifetime_seconds=settings.certificate_lifetime_seconds
    )
    if claims["sub"] != str(user.id) or claims["run"] != run.slug:
        raise Forbidden("this certificate belongs to another user or run", code="certificate_mismatch")
    await admit(session, run=run, user=user)  # a ban since the last join takes effect here
    peer = await session.scalar(select(Peer).where(Peer.run_id == run.id, Peer.peer_id == claims["peer_id"]))
    if peer is None or peer.peer_key != claims["peer_key"]:
        raise Unauthenticated("this peer is unknown; join again", code="unknown_peer")
    return await _issue(session, settings=settings, run=run, user=user, peer=peer)
