"""What the run pages show beyond the accounting endpoints: progress now and the peers seen lately.

A peer counts as live while the server heard from it (a report, a join or a renewal) within
`peer_live_seconds`; the signaling hub knows only this replica's connections, reports reach every replica's
database."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.core.timeutil import utcnow
from hivewire_server.models import Peer, Report, Round, RoundMember, Run, User

MAX_LIVE_PEERS = 500  # a page, not an export: the busiest peers of a huge run are enough to read
LINK_NAMES = {"host": "host", "srflx": "reflexive", "relay": "relay", "direct_tls": "direct TLS"}


@dataclass
class LivePeer:
    peer_id: str
    user_id: int
    display_name: str
    samples_per_second: float | None
    link_types: str
    client_version: str
    device_kind: str
    last_seen: datetime


@dataclass
class Progress:
    epoch: int
    reported_samples: int
    verified_samples: int
    rounds: int
    active_peers: int
    samples_per_second: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def describe_links(counts: object, links: object = None) -> str:
    """ "host 1 · relay 2 (3.1 MB/s)" from a report's link counts and, where it sent them, the rates measured
    on its links (the best per type); empty links read as "none yet"."""
    if not isinstance(counts, dict):
        return "unknown"
    best: dict[str, float] = {}
    for link in links if isinstance(links, list) else ():
        if isinstance(link, dict) and link.get("type") in LINK_NAMES and isinstance(link.get("bytes_per_s"), float):
            best[link["type"]] = max(best.get(link["type"], 0.0), link["bytes_per_s"])
    parts = [
        f"{LINK_NAMES[name]} {count}" + (f" ({best[name] / 1e6:.1f} MB/s)" if best.get(name) else "")
        for name, count in counts.items()
        if name in LINK_NAMES and count
    ]
    return " · ".join(parts) or "none yet"


async def live_peers(session: AsyncSession, *, run: Run, live_seconds: int) -> list[LivePeer]:
    """Peers heard from lately, newest first, each with what its latest report said."""
    cutoff = utcnow() - timedelta(seconds=live_seconds)
    latest = (
        select(func.max(Report.id).label("report_pk"))
        .where(Report.run_id == run.id, Report.created_at >= cutoff)
        .group_by(Report.peer_id)
        .subquery()
    )
    reported = await session.execute(
        select(Report, User.display_name)
        .join(latest, Report.id == latest.c.report_pk)
        .join(User, User.id == Report.user_id)
        .order_by(Report.created_at.desc())
        .limit(MAX_LIVE_PEERS)
    )
    peers: dict[str, LivePeer] = {}
    for report, name in reported:
        details = report.details or {}
        peers[report.peer_id] = LivePeer(
            peer_id=report.peer_id,
            user_id=report.user_id,
            display_name=name,
            samples_per_second=report.samples_per_second,
            link_types=describe_links(details.get("link_types"), details.get("links")),
            client_version=str(details.get("client_version", "")),
            device_kind=str(details.get("device_kind", "")),
            last_seen=report.created_at,
        )
    joined = await session.execute(
        select(Peer, User.display_name)
        .join(User, User.id == Peer.user_id)
        .where(Peer.run_id == run.id, Peer.last_seen_at >= cutoff)
        .order_by(Peer.last_seen_at.desc())
        .limit(MAX_LIVE_PEERS)
    )
    for peer, name in joined:
        known = peers.get(peer.peer_id)
        if known is None:
            peers[peer.peer_id] = LivePeer(
                peer.peer_id, peer.user_id, name, None, "not reported yet", "", "", peer.last_seen_at
            )
        elif peer.last_seen_at > known.last_seen:
            known.last_seen = peer.last_seen_at
    return sorted(peers.values(), key=lambda p: p.last_seen, reverse=True)[:MAX_LIVE_PEERS]


async def progress(session: AsyncSession, *, run: Run, live_seconds: int) -> Progress:
    """The run's epoch (highest reported or co-signed), its samples, and how many peers train now."""
    reported_epoch, reported_samples = (
        await session.execute(
            select(func.max(Report.epoch), func.coalesce(func.sum(Report.samples), 0)).where(Report.run_id == run.id)
        )
    ).one()
    round_epoch, rounds = (
        await session.execute(select(func.max(Round.epoch), func.count(Round.id)).where(Round.run_id == run.id))
    ).one()
    verified = await session.scalar(
        select(func.coalesce(func.sum(RoundMember.samples), 0)).where(RoundMember.run_id == run.id)
    )
    peers = await live_peers(session, run=run, live_seconds=live_seconds)
    return Progress(
        epoch=max(reported_epoch or 0, round_epoch or 0),
        reported_samples=int(reported_samples),
        verified_samples=int(verified or 0),
        rounds=int(rounds),
        active_peers=len(peers),
        samples_per_second=round(sum(p.samples_per_second or 0.0 for p in peers), 1),
    )
