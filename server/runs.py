"""Runs and memberships: create, edit, list, allowlist, ban."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.core.timeutil import utcnow
from hivewire_server.errors import Banned, Conflict, Forbidden, InvalidInput, NotFound
from hivewire_server.models import Membership, Peer, Run, User
from hivewire_server.schemas import RunCreate, RunUpdate


def require_organizer(user: User) -> None:
    if not user.is_organizer:
        raise Forbidden("only organizers can do this; ask an organizer of this server", code="not_organizer")


async def create_run(session: AsyncSession, *, owner: User, spec: RunCreate) -> Run:
    require_organizer(owner)
    run = Run(owner_id=owner.id, **spec.model_dump())
    session.add(run)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(f"a run named {spec.slug!r} exists already", code="slug_taken") from exc
    return run


async def update_run(session: AsyncSession, *, user: User, run: Run, changes: RunUpdate) -> Run:
    require_organizer(user)
    for field, value in changes.model_dump(exclude_unset=True).items():
        if value is None:
            raise InvalidInput(f"{field} cannot be null", code="null_field")
        setattr(run, field, value)
    await session.commit()
    return run


async def _membership(session: AsyncSession, run: Run, user_id: int) -> Membership | None:
    return await session.scalar(select(Membership).where(Membership.run_id == run.id, Membership.user_id == user_id))


def _can_see(run: Run, user: User | None, membership: Membership | None) -> bool:
    return run.visibility == "public" or (user is not None and user.is_organizer) or membership is not None


async def get_run(session: AsyncSession, *, slug: str, user: User | None) -> Run:
    """A run the user may see; private runs look absent to others (no existence leak)."""
    run = await session.scalar(select(Run).where(Run.slug == slug))
    membership = await _membership(session, run, user.id) if run is not None and user is not None else None
    if run is None or not _can_see(run, user, membership):
        raise NotFound(f"no run named {slug!r}", code="unknown_run")
    return run


async def list_runs(session: AsyncSession, *, user: User | None) -> list[Run]:
    query = select(Run).order_by(Run.created_at.desc(), Run.id.desc())
    if user is None:
        query = query.where(Run.visibility == "public")
    elif not user.is_organizer:
        member_runs = select(Membership.run_id).where(Membership.user_id == user.id)
        query = query.where(or_(Run.visibility == "public", Run.id.in_(member_runs)))
    return list(await session.scalars(query))


async def _membership_for_update(session: AsyncSession, run: Run, user_id: int) -> Membership:
    if await session.get(User, user_id) is None:
        raise NotFound(f"no user with id {user_id}", code="unknown_user")
    membership = await _membership(session, run, user_id)
    if membership is None:
        membership = Membership(run_id=run.id, user_id=user_id)
        session.add(membership)
    return membership


async def set_ban(
    session: AsyncSession, *, organizer: User, run: Run, user_id: int, banned: bool, reason: str = ""
) -> Membership:
    require_organizer(organizer)
    if banned and user_id == organizer.id:
        raise InvalidInput("you cannot ban yourself", code="self_ban")
    membership = await _membership_for_update(session, run, user_id)
    membership.banned_at = utcnow() if banned else None
    membership.ban_reason = reason if banned else ""
    await session.commit()
    return membership


async def set_allowed(session: AsyncSession, *, organizer: User, run: Run, user_id: int, allowed: bool) -> Membership:
    require_organizer(organizer)
    membership = await _membership_for_update(session, run, user_id)
    membership.allowed = allowed
    await session.commit()
    return membership


async def list_members(session: AsyncSession, *, organizer: User, run: Run) -> list[tuple[Membership, User]]:
    require_organizer(organizer)
    rows = await session.execute(
        select(Membership, User).join(User, User.id == Membership.user_id).where(Membership.run_id == run.id)
    )
    return [(membership, user) for membership, user in rows]


async def admit(session: AsyncSession, *, run: Run, user: User) -> Membership:
    """Checks that the user may take part (not banned, run open, allowlisted where needed) and records the join."""
    membership = await _membership(session, run, user.id)
    if membership is not None and membership.banned_at is not None:
        raise Banned(f"you are banned from run {run.slug!r}", code="banned")
    if run.status == "closed":
        raise Forbidden(f"run {run.slug!r} is closed: its organizer stopped taking volunteers", code="run_closed")
    if run.join_policy == "allowlist" and not (membership and membership.allowed) and run.owner_id != user.id:
        raise Forbidden(f"run {run.slug!r} admits only invited volunteers; ask its organizer", code="not_allowed")
    if membership is None:
        membership = Membership(run_id=run.id, user_id=user.id)
        session.add(membership)
    if membership.joined_at is None:
        membership.joined_at = utcnow()
    await session.flush()
    return membership


async def check_capacity(session: AsyncSession, *, run: Run, peer_id: str, live_seconds: int) -> None:
    """Refuses a peer that would make more than `run.max_peers` live at once; a live peer joining again passes.

    Live means seen within `live_seconds` (join, renewal or signaling heartbeat), as for initial peers. Two
    joins racing for the last place may both pass: the limit bounds load, it is not a reservation.
    """
    if run.max_peers == 0:
        return
    live = await session.scalar(
        select(func.count())
        .select_from(Peer)
        .where(
            Peer.run_id == run.id,
            Peer.peer_id != peer_id,
            Peer.last_seen_at >= utcnow() - timedelta(seconds=live_seconds),
        )
    )
    if (live or 0) >= run.max_peers:
        raise Conflict(
            f"run {run.slug!r} is full: {run.max_peers} peers are training, its organizer's limit", code="run_full"
        )
