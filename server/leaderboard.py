"""Contribution accounting and ranking per run, and the run's time series, read from reports and receipts."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.core.timeutil import utcnow
from hivewire_server.errors import InvalidInput
from hivewire_server.models import Report, RoundMember, Run, User
from hivewire_server.schemas import LeaderboardRow, MetricsBucket

MAX_BUCKETS = 1440
DEFAULT_WINDOW = timedelta(hours=1)
# A time series reads at most this many reports; a longer window needs wider buckets or a later `since`.
MAX_SERIES_REPORTS = 200_000


async def leaderboard(session: AsyncSession, *, run: Run) -> list[LeaderboardRow]:
    """Everyone who reported or was co-signed in a run, ranked by verified samples (ties share a rank)."""
    verified = await session.execute(
        select(
            RoundMember.user_id,
            func.sum(RoundMember.samples),
            func.count(func.distinct(RoundMember.round_pk)),
        )
        .where(RoundMember.run_id == run.id)
        .group_by(RoundMember.user_id)
    )
    reported = await session.execute(
        select(Report.user_id, func.sum(Report.samples), func.sum(Report.online_seconds))
        .where(Report.run_id == run.id)
        .group_by(Report.user_id)
    )
    totals: dict[int, dict[str, float]] = defaultdict(dict)
    for user_id, samples, rounds in verified:
        totals[user_id].update(verified=samples, rounds=rounds)
    for user_id, samples, online in reported:
        totals[user_id].update(reported=samples, online=online)
    names = dict((await session.execute(select(User.id, User.display_name).where(User.id.in_(totals)))).all())
    rows = sorted(
        (
            LeaderboardRow(
                rank=0,
                user_id=user_id,
                display_name=names.get(user_id, ""),
                verified_samples=int(total.get("verified", 0)),
                reported_samples=int(total.get("reported", 0)),
                online_seconds=round(float(total.get("online", 0.0)), 3),
                rounds=int(total.get("rounds", 0)),
            )
            for user_id, total in totals.items()
        ),
        key=lambda row: (-row.verified_samples, -row.reported_samples, row.user_id),
    )
    for position, row in enumerate(rows, start=1):
        tied = position > 1 and rows[position - 2].verified_samples == row.verified_samples
        row.rank = rows[position - 2].rank if tied else position
    return rows


def window(since: datetime | None, bucket_seconds: int) -> datetime:
    """The series' start, checked: naive times are UTC, and the window holds at most MAX_BUCKETS buckets."""
    now = utcnow()
    start = now - DEFAULT_WINDOW if since is None else since if since.tzinfo else since.replace(tzinfo=UTC)
    if (now - start).total_seconds() / bucket_seconds > MAX_BUCKETS:
        raise InvalidInput(
            f"since and bucket_seconds make more than {MAX_BUCKETS} buckets; widen the buckets or start later",
            code="too_many_buckets",
        )
    return start


async def series(session: AsyncSession, *, run: Run, since: datetime, bucket_seconds: int) -> list[MetricsBucket]:
    """Buckets (by the reports' own times) that hold reports: mean loss, global samples/s, distinct peers."""
    rows = await session.execute(
        select(Report.reported_at, Report.peer_id, Report.samples, Report.loss)
        .where(Report.run_id == run.id, Report.reported_at >= since)
        .order_by(Report.reported_at)
        .limit(MAX_SERIES_REPORTS)
    )
    origin = since.timestamp()
    buckets: dict[int, list[tuple[str, int, float | None]]] = defaultdict(list)
    for reported_at, peer_id, samples, loss in rows:
        buckets[int((reported_at.timestamp() - origin) // bucket_seconds)].append((peer_id, samples, loss))
    result = []
    for index in sorted(buckets):
        entries = buckets[index]
        losses = [loss for _, _, loss in entries if loss is not None]
        result.append(
            MetricsBucket(
                start=since + timedelta(seconds=index * bucket_seconds),
                loss_mean=sum(losses) / len(losses) if losses else None,
                samples_per_second=sum(samples for _, samples, _ in entries) / bucket_seconds,
                active_peers=len({peer_id for peer_id, _, _ in entries}),
                reports=len(entries),
            )
        )
    return result
