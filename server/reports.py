"""Progress reports: each one checked on its own (shape, owner, signature, plausibility) and stored once.

A batch comes from one authenticated peer; a bad report is refused with a reason while its neighbours are
still counted, and a resent report (same report_id) is answered as a duplicate and counted once."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.accounting import record_failure, report_signing_bytes, signature_valid
from hivewire_server.core.config import Settings
from hivewire_server.core.timeutil import utcnow
from hivewire_server.errors import Conflict, DomainError, InvalidInput
from hivewire_server.models import Peer, Report, Run
from hivewire_server.schemas import RefusedReport, ReportIn, ReportsAnswer

MAX_BATCH = 100


def _parse(raw: dict[str, object]) -> ReportIn:
    try:
        return ReportIn.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "report"
        raise InvalidInput(f"{where}: {first['msg']}", code="malformed") from exc


def _check_plausible(
    report: ReportIn, *, settings: Settings, now: float, previous: float | None, joined: float
) -> float:
    """Raises unless the numbers could be true; returns the seconds since the previous report (0 for a first)."""
    if report.time > now + settings.report_max_skew_seconds:
        raise InvalidInput(
            f"time is {report.time - now:.0f} s ahead of the server's clock (at most "
            f"{settings.report_max_skew_seconds:.0f} s)",
            code="in_the_future",
        )
    if report.time < now - settings.report_max_age_seconds:
        raise InvalidInput(
            f"the report is older than {settings.report_max_age_seconds:.0f} s", code="too_old"
        )  # fmt: skip
    if previous is not None and report.time <= previous:
        raise InvalidInput("time is not after the peer's previous report", code="out_of_order")
    if report.samples_per_second > settings.max_samples_per_second:
        raise InvalidInput(
            f"samples_per_second {report.samples_per_second:g} is over the limit of "
            f"{settings.max_samples_per_second:g}",
            code="implausible_rate",
        )
    elapsed = max(0.0, report.time - (joined if previous is None else previous))
    bound = settings.max_samples_per_second * (elapsed + settings.report_slack_seconds)
    if report.samples > bound:
        raise InvalidInput(
            f"{report.samples} samples in {elapsed:.0f} s is over the plausible {bound:.0f}",
            code="implausible_samples",
        )
    return 0.0 if previous is None else elapsed


async def _latest_time(session: AsyncSession, *, run: Run, peer: Peer) -> float | None:
    latest = await session.scalar(
        select(func.max(Report.reported_at)).where(Report.run_id == run.id, Report.peer_id == peer.peer_id)
    )
    return None if latest is None else latest.replace(tzinfo=UTC).timestamp()


async def ingest(
    session: AsyncSession, *, settings: Settings, run: Run, peer: Peer, reports: list[dict[str, object]]
) -> ReportsAnswer:
    """Stores the acceptable reports of one batch in one transaction; every refusal is answered and recorded."""
    if len(reports) > MAX_BATCH:
        raise InvalidInput(f"a batch holds at most {MAX_BATCH} reports, not {len(reports)}", code="batch_too_large")
    answer = ReportsAnswer(accepted=[], duplicate=[], refused=[])
    now = utcnow().timestamp()
    joined = peer.created_at.timestamp()
    previous = await _latest_time(session, run=run, peer=peer)
    in_batch: set[str] = set()
    for raw in reports:
        sent_id = raw.get("report_id")
        subject = sent_id[:64] if isinstance(sent_id, str) else None
        try:
            report = _parse(raw)
            if report.peer_id != peer.peer_id:
                raise InvalidInput(f"peer_id {report.peer_id} is not the certificate's", code="wrong_peer")
            if not signature_valid(peer.peer_key, report.signature, report_signing_bytes(report)):
                raise InvalidInput("the signature does not verify with the peer key", code="bad_signature")
            stored_by = await session.scalar(select(Report.peer_id).where(Report.report_id == report.report_id))
            if report.report_id in in_batch or stored_by == peer.peer_id:
                answer.duplicate.append(report.report_id)
                continue
            if stored_by is not None:
                raise InvalidInput("report_id is taken by another peer's report", code="report_id_taken")
            elapsed = _check_plausible(report, settings=settings, now=now, previous=previous, joined=joined)
        except DomainError as exc:
            answer.refused.append(RefusedReport(report_id=subject, reason=exc.code, detail=exc.message))
            record_failure(
                session, run=run, peer=peer, kind="report", subject=subject, reason=exc.code, detail=exc.message
            )
            continue
        session.add(
            Report(
                report_id=report.report_id,
                run_id=run.id,
                user_id=peer.user_id,
                peer_id=peer.peer_id,
                epoch=report.epoch,
                samples=report.samples,
                loss=report.loss,
                samples_per_second=report.samples_per_second,
                details={
                    "link_types": report.link_types.model_dump(),
                    "links": [link.model_dump() for link in report.links or ()],
                    "client_version": report.client_version,
                    "device_kind": report.device_kind,
                },
                reported_at=datetime.fromtimestamp(report.time, UTC),
                online_seconds=min(elapsed, settings.report_online_gap_seconds),
            )
        )
        previous = report.time
        in_batch.add(report.report_id)
        answer.accepted.append(report.report_id)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict("a concurrent upload stored one of these reports; send the batch again", code="retry") from exc
    return answer
