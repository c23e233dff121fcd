"""Run pages: the public page and the join instructions for volunteers; create, edit and manage (live peers,
bans, verification failures) for organizers. Forms post back here, with CSRF, and show the server's
validation errors next to the fields they concern."""

from __future__ import annotations

from typing import Any, get_args

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import select

from hivewire_server import leaderboard, runs
from hivewire_server.api.deps import HubDep, OptionalUser, SessionDep, SettingsDep
from hivewire_server.client_wheels import install_command
from hivewire_server.dashboard import overview
from hivewire_server.dashboard.web import check_csrf, error_page, render, to_login
from hivewire_server.errors import Conflict, DomainError
from hivewire_server.models import Membership, Run, User
from hivewire_server.schemas import (
    Compression,
    JoinPolicy,
    RunCreate,
    RunStatus,
    RunUpdate,
    Strategy,
    Visibility,
)

router = APIRouter(include_in_schema=False)

RUN_FIELDS = (
    "slug",
    "name",
    "description",
    "recipe",
    "recipe_version",
    "strategy",
    "target_batch_size",
    "group_size",
    "compression",
    "visibility",
    "join_policy",
    "max_peers",
    "inner_steps",
    "overlap",
)
# A run is created open; only the edit form can close it.
EDIT_FIELDS = (*RUN_FIELDS, "status")
# A select rather than a checkbox: an unticked box sends nothing, which would read as "keep the default" (yes).
OVERLAP_CHOICES = ("yes", "no")  # pydantic reads both as booleans
CHOICES: dict[str, tuple[str, ...]] = {
    "strategy": get_args(Strategy),
    "compression": get_args(Compression),
    "visibility": get_args(Visibility),
    "join_policy": get_args(JoinPolicy),
    "status": get_args(RunStatus),
    "overlap": OVERLAP_CHOICES,
}
# Pydantic's own words for a pattern mismatch quote the regular expression; people need the rule instead.
PATTERN_HINTS = {
    "slug": "2 to 63 lowercase letters, digits and hyphens, starting with a letter or digit",
    "recipe": "a recipe name: lowercase letters, digits, '.', '_' and '-' (for example tiny-lm)",
    "recipe_version": "letters, digits and . _ + - only (for example 1 or 2.0)",
}
NEW_RUN = {
    "recipe_version": "1",
    "strategy": "dedloc",
    "group_size": "16",
    "compression": "none",
    "max_peers": "0",
    "inner_steps": "500",
    "overlap": "yes",
}


def _field_errors(exc: ValidationError) -> dict[str, str]:
    errors: dict[str, str] = {}
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "name"
        if error["type"] == "string_pattern_mismatch" and field in PATTERN_HINTS:
            message = PATTERN_HINTS[field]
        elif error["type"] == "missing":
            message = "this field is required"
        else:
            message = str(error["msg"])
        errors.setdefault(field, message)
    return errors


async def _run_form(request: Request, fields: tuple[str, ...]) -> tuple[dict[str, str], str]:
    """The submitted run fields (blank ones left out, so a required blank reads as missing) and the CSRF token."""
    form = await request.form()
    values = {field: str(form.get(field, "")).strip() for field in fields}
    return values, str(form.get("csrf", ""))


def _form_page(
    request: Request, user: User, *, run: Run | None, values: dict[str, Any], errors: dict[str, str]
) -> Response:
    return render(request, "run_form.html", user, run=run, values=values, errors=errors, choices=CHOICES)


@router.get("/runs/{slug}")
async def run_page(
    slug: str, request: Request, user: OptionalUser, session: SessionDep, settings: SettingsDep
) -> Response:
    try:
        run = await runs.get_run(session, slug=slug, user=user)
    except DomainError as exc:
        return error_page(request, user, exc)
    now = await overview.progress(session, run=run, live_seconds=settings.peer_live_seconds)
    rows = await leaderboard.leaderboard(session, run=run)
    return render(request, "run.html", user, run=run, progress=now, leaderboard=rows)


@router.get("/runs/{slug}/join")
async def join_page(
    slug: str, request: Request, user: OptionalUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """The commands to copy, unless the volunteer could not join anyway (banned, not on the allowlist)."""
    if user is None:
        return to_login(request)
    try:
        run = await runs.get_run(session, slug=slug, user=user)
    except DomainError as exc:
        return error_page(request, user, exc)
    membership = await session.scalar(
        select(Membership).where(Membership.run_id == run.id, Membership.user_id == user.id)
    )
    refusal = ""
    if membership is not None and membership.banned_at is not None:
        refusal = "You are banned from this run" + (f": {membership.ban_reason}" if membership.ban_reason else ".")
    elif run.status == "closed":
        refusal = "This run is closed: its organizer stopped taking volunteers."
    elif run.join_policy == "allowlist" and not (membership and membership.allowed) and run.owner_id != user.id:
        refusal = "This run admits only invited volunteers; ask its organizer to add you."
    # The wheel this server serves, when it serves one (client_wheels.py); else the package index.
    wheel = await run_in_threadpool(request.app.state.client_wheels.newest)
    commands = [
        install_command(settings.base_url, wheel),
        f"hivewire login {settings.base_url}",
        f"hivewire join {settings.base_url}/runs/{run.slug}",
    ]
    return render(request, "join.html", user, run=run, commands=commands, refusal=refusal, wheel=wheel)


@router.get("/organize/runs/new")
async def new_run_page(request: Request, user: OptionalUser) -> Response:
    if user is None:
        return to_login(request)
    try:
        runs.require_organizer(user)
    except DomainError as exc:
        return error_page(request, user, exc)
    return _form_page(request, user, run=None, values=NEW_RUN, errors={})


@router.post("/organize/runs/new")
async def create_run_form(request: Request, user: OptionalUser, session: SessionDep) -> Response:
    if user is None:
        return to_login(request)
    values, csrf = await _run_form(request, RUN_FIELDS)
    check_csrf(request, csrf)
    errors: dict[str, str] = {}
    try:
        spec = RunCreate.model_validate(
            {field: value for field, value in values.items() if value or field == "description"}
        )
        run = await runs.create_run(session, owner=user, spec=spec)
    except ValidationError as exc:
        errors = _field_errors(exc)
    except Conflict as exc:
        errors = {"slug": exc.message}
    except DomainError as exc:
        return error_page(request, user, exc)
    if errors:
        return _form_page(request, user, run=None, values=values, errors=errors)
    request.session["flash"] = f"Run {run.name} created."
    return RedirectResponse(f"/runs/{run.slug}/manage", status_code=303)


async def _organized_run(user: User, session: SessionDep, slug: str) -> Run:
    runs.require_organizer(user)
    return await runs.get_run(session, slug=slug, user=user)


@router.get("/runs/{slug}/edit")
async def edit_run_page(slug: str, request: Request, user: OptionalUser, session: SessionDep) -> Response:
    if user is None:
        return to_login(request)
    try:
        run = await _organized_run(user, session, slug)
    except DomainError as exc:
        return error_page(request, user, exc)
    values = {field: getattr(run, field) for field in EDIT_FIELDS}
    values["overlap"] = OVERLAP_CHOICES[0] if run.overlap else OVERLAP_CHOICES[1]
    return _form_page(request, user, run=run, values=values, errors={})


@router.post("/runs/{slug}/edit")
async def update_run_form(slug: str, request: Request, user: OptionalUser, session: SessionDep) -> Response:
    if user is None:
        return to_login(request)
    values, csrf = await _run_form(request, EDIT_FIELDS)
    check_csrf(request, csrf)
    try:
        run = await _organized_run(user, session, slug)
    except DomainError as exc:
        return error_page(request, user, exc)
    values["slug"] = run.slug  # the slug names the run in every client's config: it does not change
    errors: dict[str, str] = {}
    try:
        changes = RunUpdate.model_validate({field: value for field, value in values.items() if field != "slug"})
        await runs.update_run(session, user=user, run=run, changes=changes)
    except ValidationError as exc:
        errors = _field_errors(exc)
    if errors:
        return _form_page(request, user, run=run, values=values, errors=errors)
    request.session["flash"] = "Run saved."
    return RedirectResponse(f"/runs/{run.slug}/manage", status_code=303)


@router.get("/runs/{slug}/manage")
async def manage_page(
    slug: str, request: Request, user: OptionalUser, session: SessionDep, settings: SettingsDep
) -> Response:
    """Live peers and members (server-rendered); verification failures come from the JSON endpoint."""
    if user is None:
        return to_login(request)
    try:
        run = await _organized_run(user, session, slug)
    except DomainError as exc:
        return error_page(request, user, exc)
    peers = await overview.live_peers(session, run=run, live_seconds=settings.peer_live_seconds)
    members = await runs.list_members(session, organizer=user, run=run)
    return render(request, "manage.html", user, run=run, peers=peers, members=members)


@router.post("/runs/{slug}/bans")
async def ban_form(
    slug: str,
    request: Request,
    user: OptionalUser,
    session: SessionDep,
    hub: HubDep,
    user_id: int = Form(ge=1),
    reason: str = Form(default="", max_length=500),
    csrf: str = Form(max_length=100),
) -> Response:
    if user is None:
        return to_login(request)
    check_csrf(request, csrf)
    try:
        run = await _organized_run(user, session, slug)
        await runs.set_ban(session, organizer=user, run=run, user_id=user_id, banned=True, reason=reason.strip())
    except DomainError as exc:
        return error_page(request, user, exc)
    await hub.ban(run.slug, user_id)  # closes the user's signaling connections, as the API's ban does
    request.session["flash"] = f"User {user_id} is banned from this run."
    return RedirectResponse(f"/runs/{run.slug}/manage", status_code=303)


@router.post("/runs/{slug}/bans/{user_id}/delete")
async def unban_form(
    slug: str, user_id: int, request: Request, user: OptionalUser, session: SessionDep, csrf: str = Form(max_length=100)
) -> Response:
    if user is None:
        return to_login(request)
    check_csrf(request, csrf)
    try:
        run = await _organized_run(user, session, slug)
        await runs.set_ban(session, organizer=user, run=run, user_id=user_id, banned=False)
    except DomainError as exc:
        return error_page(request, user, exc)
    request.session["flash"] = f"User {user_id} may join again."
    return RedirectResponse(f"/runs/{run.slug}/manage", status_code=303)
