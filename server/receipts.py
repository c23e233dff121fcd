"""Round receipts: what an averaging group's members co-signed about each other's samples, verified member by
member and stored once. These are the leaderboard's verified samples, so every check refuses the whole receipt."""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.accounting import authenticate_peer, receipt_signing_bytes, record_failure, signature_valid
from hivewire_server.core.config import Settings
from hivewire_server.core.timeutil import utcnow
from hivewire_server.errors import Conflict, DomainError, Forbidden, InvalidInput
from hivewire_server.models import Peer, Round, RoundMember, Run
from hivewire_server.schemas import ReceiptAnswer, ReceiptIn


def _check_shape(receipt: ReceiptIn, uploader: Peer) -> None:
    peer_ids = [member.peer_id for member in receipt.members]
    if len(set(peer_ids)) != len(peer_ids):
        raise InvalidInput("a peer is named twice among the members", code="duplicate_member")
    if uploader.peer_id not in peer_ids:
        raise Forbidden(f"the uploader {uploader.peer_id} is not a member of this round", code="not_a_member")
    missing = sorted(set(peer_ids) - set(receipt.signatures))
    if missing:
        raise InvalidInput(f"no signature from member {missing[0]}", code="missing_signature")
    strangers = sorted(set(receipt.signatures) - set(peer_ids))
    if strangers:
        raise InvalidInput(f"a signature from {strangers[0]}, who is not a member", code="unknown_signer")


async def _member_peer(session: AsyncSession, *, settings: Settings, run: Run, peer_id: str, certificate: str) -> Peer:
    """The member's peer row, through its certificate; any failure names the member."""
    try:
        _, peer = await authenticate_peer(
            session,
            settings=settings,
            slug=run.slug,
            certificate=certificate,
            grace_seconds=settings.receipt_certificate_grace_seconds,
        )
    except DomainError as exc:
        raise InvalidInput(f"member {peer_id}: {exc.message}", code=f"member_{exc.code}") from exc
    if peer.peer_id != peer_id:
        raise InvalidInput(f"member {peer_id} carries the certificate of {peer.peer_id}", code="member_wrong_peer")
    return peer


async def _check_plausible(session: AsyncSession, *, settings: Settings, run: Run, peer: Peer, samples: int) -> None:
    """A peer's verified samples, this round included, cannot exceed what the rate limit allows since it joined."""
    verified = await session.scalar(
        select(func.coalesce(func.sum(RoundMember.samples), 0)).where(
            RoundMember.run_id == run.id, RoundMember.peer_id == peer.peer_id
        )
    )
    elapsed = max(0.0, (utcnow() - peer.created_at).total_seconds())
    bound = settings.max_samples_per_second * (elapsed + settings.report_slack_seconds)
    if int(verified or 0) + samples > bound:
        raise InvalidInput(
            f"member {peer.peer_id}: {samples} more samples would exceed the plausible {bound:.0f} since it joined",
            code="implausible_samples",
        )


async def _verify(
    session: AsyncSession, *, settings: Settings, run: Run, receipt: ReceiptIn, message: bytes
) -> list[tuple[Peer, int]]:
    members: list[tuple[Peer, int]] = []
    for member in receipt.members:
        peer = await _member_peer(
            session, settings=settings, run=run, peer_id=member.peer_id, certificate=member.certificate
        )
        if not signature_valid(peer.peer_key, receipt.signatures[member.peer_id], message):
            raise InvalidInput(f"the signature of member {member.peer_id} does not verify", code="bad_signature")
        await _check_plausible(session, settings=settings, run=run, peer=peer, samples=member.samples)
        members.append((peer, member.samples))
    return members


async def store(
    session: AsyncSession, *, settings: Settings, run: Run, uploader: Peer, receipt: ReceiptIn
) -> ReceiptAnswer:
    """Stores a verified receipt once; the same receipt again is a duplicate, a different one under its id a
    conflict. A refusal is recorded for the organizer before it is raised."""
    message = receipt_signing_bytes(
        run=run.slug,
        round_id=receipt.round_id,
        epoch=receipt.epoch,
        members=[(member.peer_id, member.samples) for member in receipt.members],
    )
    digest = hashlib.sha256(message).hexdigest()
    try:
        existing = await session.scalar(select(Round).where(Round.round_id == receipt.round_id))
        if existing is not None and existing.run_id == run.id and existing.digest == digest:
            return ReceiptAnswer(round_id=receipt.round_id, status="duplicate")
        if existing is not None:
            raise Conflict(f"another receipt is stored as round {receipt.round_id}", code="conflicting_receipt")
        _check_shape(receipt, uploader)
        members = await _verify(session, settings=settings, run=run, receipt=receipt, message=message)
    except DomainError as exc:
        record_failure(
            session,
            run=run,
            peer=uploader,
            kind="receipt",
            subject=receipt.round_id,
            reason=exc.code,
            detail=exc.message,
        )
        await session.commit()
        raise
    session.add(
        Round(
            round_id=receipt.round_id,
            run_id=run.id,
            epoch=receipt.epoch,
            digest=digest,
            uploaded_by=uploader.user_id,
            members=[
                RoundMember(run_id=run.id, user_id=peer.user_id, peer_id=peer.peer_id, samples=samples)
                for peer, samples in members
            ],
        )
    )
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict("a concurrent upload stored this round; send it again", code="retry") from exc
    return ReceiptAnswer(round_id=receipt.round_id, status="stored")
