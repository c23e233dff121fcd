"""Runs: create, edit, list, read; allowlist and bans (organizers)."""

from __future__ import annotations

from fastapi import APIRouter

from hivewire_server import runs
from hivewire_server.api.deps import CurrentOrganizer, HubDep, OptionalUser, SessionDep
from hivewire_server.schemas import (
    BanRequest,
    MemberPublic,
    MembersPublic,
    RunCreate,
    RunSpec,
    RunsPublic,
    RunUpdate,
    UserRef,
)

router = APIRouter(prefix="/api/runs", tags=["runs"])


@router.post("", status_code=201)
async def create_run(body: RunCreate, user: CurrentOrganizer, session: SessionDep) -> RunSpec:
    return RunSpec.model_validate(await runs.create_run(session, owner=user, spec=body))


@router.get("")
async def list_runs(user: OptionalUser, session: SessionDep) -> RunsPublic:
    rows = await runs.list_runs(session, user=user)
    return RunsPublic(data=[RunSpec.model_validate(row) for row in rows], count=len(rows))


@router.get("/{slug}")
async def get_run(slug: str, user: OptionalUser, session: SessionDep) -> RunSpec:
    return RunSpec.model_validate(await runs.get_run(session, slug=slug, user=user))


@router.patch("/{slug}")
async def update_run(slug: str, body: RunUpdate, user: CurrentOrganizer, session: SessionDep) -> RunSpec:
    run = await runs.get_run(session, slug=slug, user=user)
    return RunSpec.model_validate(await runs.update_run(session, user=user, run=run, changes=body))


@router.get("/{slug}/members")
async def list_members(slug: str, user: CurrentOrganizer, session: SessionDep) -> MembersPublic:
    run = await runs.get_run(session, slug=slug, user=user)
    rows = await runs.list_members(session, organizer=user, run=run)
    data = [
        MemberPublic(
            user_id=member.id,
            display_name=member.display_name,
            allowed=membership.allowed,
            joined_at=membership.joined_at,
            banned_at=membership.banned_at,
            ban_reason=membership.ban_reason,
        )
        for membership, member in rows
    ]
    return MembersPublic(data=data, count=len(data))


@router.post("/{slug}/bans", status_code=201)
async def ban(
    slug: str, body: BanRequest, user: CurrentOrganizer, session: SessionDep, hub: HubDep
) -> dict[str, int | bool]:
    run = await runs.get_run(session, slug=slug, user=user)
    await runs.set_ban(session, organizer=user, run=run, user_id=body.user_id, banned=True, reason=body.reason)
    await hub.ban(run.slug, body.user_id)  # closes the user's open signaling connections (4003)
    return {"user_id": body.user_id, "banned": True}


@router.delete("/{slug}/bans/{user_id}")
async def unban(slug: str, user_id: int, user: CurrentOrganizer, session: SessionDep) -> dict[str, int | bool]:
    run = await runs.get_run(session, slug=slug, user=user)
    await runs.set_ban(session, organizer=user, run=run, user_id=user_id, banned=False)
    return {"user_id": user_id, "banned": False}


@router.post("/{slug}/allowlist", status_code=201)
async def allow(slug: str, body: UserRef, user: CurrentOrganizer, session: SessionDep) -> dict[str, int | bool]:
    run = await runs.get_run(session, slug=slug, user=user)
    await runs.set_allowed(session, organizer=user, run=run, user_id=body.user_id, allowed=True)
    return {"user_id": body.user_id, "allowed": True}


@router.delete("/{slug}/allowlist/{user_id}")
async def disallow(slug: str, user_id: int, user: CurrentOrganizer, session: SessionDep) -> dict[str, int | bool]:
    run = await runs.get_run(session, slug=slug, user=user)
    await runs.set_allowed(session, organizer=user, run=run, user_id=user_id, allowed=False)
    return {"user_id": user_id, "allowed": False}
