"""Reports and round receipts from peers (peer certificate as bearer), the leaderboard, the run's time series
and, for organizers, the refusals on record."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from hivewire_server import accounting, leaderboard, receipts, reports, runs
from hivewire_server.api.deps import CurrentOrganizer, OptionalUser, SessionDep, SettingsDep
from hivewire_server.errors import DomainError, Unauthenticated
from hivewire_server.metrics import ServerMetrics
from hivewire_server.models import Peer, Run
from hivewire_server.schemas import (
    Leaderboard,
    ReceiptAnswer,
    ReceiptIn,
    ReportBatch,
    ReportsAnswer,
    RunMetrics,
    VerificationFailurePublic,
    VerificationFailures,
)

router = APIRouter(prefix="/api/runs", tags=["accounting"])
log = logging.getLogger("hivewire.accounting")

MAX_CERTIFICATE_CHARS = 4096


def _metrics(request: Request) -> ServerMetrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


async def _peer(session: SessionDep, settings: SettingsDep, slug: str, authorization: str | None) -> tuple[Run, Peer]:
    """The peer certificate in `Authorization: Bearer <certificate>`: a peer credential, not an API token."""
    scheme, _, certificate = (authorization or "").partition(" ")
    try:
        if scheme.lower() != "bearer" or not certificate or len(certificate) > MAX_CERTIFICATE_CHARS:
            raise Unauthenticated("expected 'Authorization: Bearer <peer certificate>'", code="bad_certificate")
        return await accounting.authenticate_peer(
            session, settings=settings, slug=slug, certificate=certificate.strip()
        )
    except DomainError as exc:
        log.warning("refused a peer upload to run %s: %s (%s)", slug, exc.code, exc.message)
        raise


@router.post("/{slug}/reports")
async def post_reports(
    slug: str,
    body: ReportBatch,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> ReportsAnswer:
    metrics = _metrics(request)
    try:
        run, peer = await _peer(session, settings, slug, authorization)
        answer = await reports.ingest(session, settings=settings, run=run, peer=peer, reports=body.reports)
    except DomainError:
        metrics.reports.inc("batch_refused")
        raise
    metrics.reports.inc("accepted", amount=len(answer.accepted))
    metrics.reports.inc("duplicate", amount=len(answer.duplicate))
    metrics.reports.inc("refused", amount=len(answer.refused))
    return answer


@router.post("/{slug}/receipts")
async def post_receipt(
    slug: str,
    body: ReceiptIn,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> ReceiptAnswer:
    metrics = _metrics(request)
    try:
        run, peer = await _peer(session, settings, slug, authorization)
        answer = await receipts.store(session, settings=settings, run=run, uploader=peer, receipt=body)
    except DomainError:
        metrics.receipts.inc("refused")
        raise
    metrics.receipts.inc(answer.status)
    response.status_code = 201 if answer.status == "stored" else 200
    return answer


@router.get("/{slug}/leaderboard")
async def get_leaderboard(slug: str, user: OptionalUser, session: SessionDep) -> Leaderboard:
    run = await runs.get_run(session, slug=slug, user=user)
    rows = await leaderboard.leaderboard(session, run=run)
    return Leaderboard(data=rows, count=len(rows))


@router.get("/{slug}/metrics")
async def get_metrics(
    slug: str,
    user: OptionalUser,
    session: SessionDep,
    since: datetime | None = None,
    bucket_seconds: Annotated[int, Query(ge=10, le=86_400)] = 60,
) -> RunMetrics:
    run = await runs.get_run(session, slug=slug, user=user)
    start = leaderboard.window(since, bucket_seconds)
    buckets = await leaderboard.series(session, run=run, since=start, bucket_seconds=bucket_seconds)
    return RunMetrics(since=start, bucket_seconds=bucket_seconds, data=buckets, count=len(buckets))


@router.get("/{slug}/verification-failures")
async def get_verification_failures(slug: str, user: CurrentOrganizer, session: SessionDep) -> VerificationFailures:
    run = await runs.get_run(session, slug=slug, user=user)
    rows = await accounting.list_failures(session, organizer=user, run=run)
    return VerificationFailures(data=[VerificationFailurePublic.model_validate(row) for row in rows], count=len(rows))
