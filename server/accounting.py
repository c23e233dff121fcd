"""What reports and round receipts share: the bytes a peer signs, the peer behind a certificate, and the record
of refusals an organizer reviews (docs/protocol.md, "Reports" and "Round receipts")."""

from __future__ import annotations

import json
import logging
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server import certificates
from hivewire_server.core.config import Settings
from hivewire_server.core.security import b64url_decode
from hivewire_server.errors import Banned, Forbidden, Unauthenticated
from hivewire_server.models import Membership, Peer, Run, User, VerificationFailure
from hivewire_server.runs import require_organizer
from hivewire_server.schemas import ReportIn

log = logging.getLogger("hivewire.accounting")

REPORT_CONTEXT = b"hivewire-report-v1\n"
RECEIPT_CONTEXT = b"hivewire-receipt-v1\n"
MAX_FAILURES_LISTED = 500


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, floats as Python's shortest round-trip repr: one spelling per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def report_signing_bytes(report: ReportIn) -> bytes:
    # exclude_none: an optional field a client left out (``links``, from older clients) was not signed
    return REPORT_CONTEXT + canonical_json(report.model_dump(exclude={"signature"}, exclude_none=True))


def receipt_signing_bytes(*, run: str, round_id: str, epoch: int, members: list[tuple[str, int]]) -> bytes:
    """The run is signed too, so a receipt cannot be replayed into another run with the same members."""
    body = {"run": run, "round_id": round_id, "epoch": epoch, "members": [list(m) for m in sorted(members)]}
    return RECEIPT_CONTEXT + canonical_json(body)


def signature_valid(peer_key: str, signature: str, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(b64url_decode(peer_key)).verify(b64url_decode(signature), message)
    except (ValueError, InvalidSignature):
        return False
    return True


async def is_banned(session: AsyncSession, *, run: Run, user_id: int) -> bool:
    banned_at = await session.scalar(
        select(Membership.banned_at).where(Membership.run_id == run.id, Membership.user_id == user_id)
    )
    return banned_at is not None


async def authenticate_peer(
    session: AsyncSession, *, settings: Settings, slug: str, certificate: str, grace_seconds: int = 0
) -> tuple[Run, Peer]:
    """The run and the peer a certificate of this server names, its user not banned; raises otherwise.

    The certificate is checked before the run is looked up, so an unauthenticated caller learns nothing about
    which (private) runs exist."""
    claims = await certificates.verify_own(
        session,
        certificate,
        issuer=settings.base_url,
        lifetime_seconds=settings.certificate_lifetime_seconds,
        grace_seconds=grace_seconds,
    )
    if claims["run"] != slug:
        raise Forbidden(f"the certificate is for run {claims['run']!r}, not {slug!r}", code="wrong_run")
    row = (
        await session.execute(
            select(Run, Peer)
            .join(Peer, Peer.run_id == Run.id)
            .where(Run.slug == slug, Peer.peer_id == claims["peer_id"])
        )
    ).first()
    if row is None or row.Peer.peer_key != claims["peer_key"] or str(row.Peer.user_id) != claims["sub"]:
        raise Unauthenticated(f"peer {claims['peer_id']} never joined run {slug!r}", code="unknown_peer")
    run, peer = row.Run, row.Peer
    if await is_banned(session, run=run, user_id=peer.user_id):
        raise Banned(f"user {peer.user_id} is banned from run {slug!r}", code="banned")
    return run, peer


def record_failure(
    session: AsyncSession, *, run: Run, peer: Peer, kind: str, subject: str | None, reason: str, detail: str
) -> None:
    """Logs a refusal and adds it to the session; the caller commits it with the rest of its work."""
    log.warning("refused %s %s from peer %s in run %s: %s (%s)", kind, subject, peer.peer_id, run.slug, reason, detail)
    session.add(
        VerificationFailure(
            run_id=run.id,
            user_id=peer.user_id,
            peer_id=peer.peer_id,
            kind=kind,
            subject=(subject or "")[:64],
            reason=reason[:64],
            detail=detail[:500],
        )
    )


async def list_failures(session: AsyncSession, *, organizer: User, run: Run) -> list[VerificationFailure]:
    """The newest refusals first, for the organizer's review page."""
    require_organizer(organizer)
    rows = await session.scalars(
        select(VerificationFailure)
        .where(VerificationFailure.run_id == run.id)
        .order_by(VerificationFailure.created_at.desc(), VerificationFailure.id.desc())
        .limit(MAX_FAILURES_LISTED)
    )
    return list(rows)
