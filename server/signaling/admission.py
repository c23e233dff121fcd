"""Who may hold a signaling connection: certificate, run and ban checks, and recording that a peer is live."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server import certificates
from hivewire_server.core.config import Settings
from hivewire_server.core.timeutil import utcnow
from hivewire_server.errors import Banned, Forbidden, NotFound
from hivewire_server.models import Membership, Peer, Run


@dataclass(frozen=True)
class PeerIdentity:
    run: str
    run_id: int
    user_id: int
    peer_id: str
    # Unix seconds after which the certificate no longer verifies (clock-skew leeway included).
    valid_until: float


async def authenticate(session: AsyncSession, *, settings: Settings, slug: str, certificate: str) -> PeerIdentity:
    """The peer a certificate names, if it is valid for this run and its user is not banned; DomainError if not."""
    claims = await certificates.verify_own(
        session, certificate, issuer=settings.base_url, lifetime_seconds=settings.certificate_lifetime_seconds
    )
    if claims["run"] != slug:
        raise Forbidden(f"this certificate is for run {claims['run']!r}, not {slug!r}", code="other_run")
    run_id = await session.scalar(select(Run.id).where(Run.slug == slug))
    if run_id is None:
        raise NotFound(f"no run named {slug!r}", code="unknown_run")
    user_id = int(claims["sub"])
    if await is_banned(session, run_id=run_id, user_id=user_id):
        raise Banned(f"you are banned from run {slug!r}", code="banned")
    return PeerIdentity(
        run=slug,
        run_id=run_id,
        user_id=user_id,
        peer_id=str(claims["peer_id"]),
        valid_until=float(claims["exp"]) + certificates.LEEWAY_SECONDS,
    )


async def is_banned(session: AsyncSession, *, run_id: int, user_id: int) -> bool:
    banned_at = await session.scalar(
        select(Membership.banned_at).where(Membership.run_id == run_id, Membership.user_id == user_id)
    )
    return banned_at is not None


async def mark_seen(session: AsyncSession, *, run_id: int, peer_id: str) -> None:
    """Keeps `Peer.last_seen_at` fresh, so that join answers name this peer among the live ones."""
    await session.execute(
        update(Peer).where(Peer.run_id == run_id, Peer.peer_id == peer_id).values(last_seen_at=utcnow())
    )
    await session.commit()
