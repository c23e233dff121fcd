"""The volunteer's own page, `/me`: runs taken part in or organized, contributions, and API tokens (mint one
for `hivewire login --token`, revoke one that leaked)."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import or_, select

from hivewire_server import accounts, leaderboard
from hivewire_server.api.deps import OptionalUser, SessionDep
from hivewire_server.dashboard.web import check_csrf, error_page, render, to_login
from hivewire_server.errors import DomainError
from hivewire_server.models import Membership, Run, User
from hivewire_server.schemas import LeaderboardRow

router = APIRouter(include_in_schema=False)

MAX_RUNS_SHOWN = 100


async def _my_runs(session: SessionDep, user: User) -> list[tuple[Run, Membership | None, LeaderboardRow | None]]:
    """Runs the user joined, was banned from or organizes, newest first, with the user's leaderboard row."""
    rows = await session.execute(
        select(Run, Membership)
        .outerjoin(Membership, (Membership.run_id == Run.id) & (Membership.user_id == user.id))
        .where(or_(Membership.id.is_not(None), Run.owner_id == user.id))
        .order_by(Run.created_at.desc(), Run.id.desc())
        .limit(MAX_RUNS_SHOWN)
    )
    result = []
    for run, membership in rows:
        mine = next((row for row in await leaderboard.leaderboard(session, run=run) if row.user_id == user.id), None)
        result.append((run, membership, mine))
    return result


async def _me(request: Request, session: SessionDep, user: User, *, new_token: str = "") -> Response:
    tokens = await accounts.list_api_tokens(session, user=user)
    return render(request, "me.html", user, my_runs=await _my_runs(session, user), tokens=tokens, new_token=new_token)


@router.get("/me")
async def me_page(request: Request, user: OptionalUser, session: SessionDep) -> Response:
    if user is None:
        return to_login(request)
    return await _me(request, session, user)


@router.post("/me/tokens")
async def create_token_form(
    request: Request,
    user: OptionalUser,
    session: SessionDep,
    name: str = Form(default="cli", min_length=1, max_length=100),
    csrf: str = Form(max_length=100),
) -> Response:
    """The token is shown once, in this response; only its hash is stored."""
    if user is None:
        return to_login(request)
    check_csrf(request, csrf)
    _, token = await accounts.create_api_token(session, user=user, name=name.strip() or "cli")
    return await _me(request, session, user, new_token=token)


@router.post("/me/tokens/{token_id}/revoke")
async def revoke_token_form(
    token_id: int, request: Request, user: OptionalUser, session: SessionDep, csrf: str = Form(max_length=100)
) -> Response:
    if user is None:
        return to_login(request)
    check_csrf(request, csrf)
    try:
        row = await accounts.revoke_api_token(session, user=user, token_id=token_id)
    except DomainError as exc:
        return error_page(request, user, exc)
    request.session["flash"] = f"Token {row.name!r} revoked: the CLI that used it must sign in again."
    return RedirectResponse("/me", status_code=303)
