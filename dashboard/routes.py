"""Server-rendered pages: sign-in and the device-approval page that `hivewire login` sends people to.
Forms carry a per-session CSRF token; the cookie is also SameSite=Lax."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from hivewire_server import accounts, device_flow, runs
from hivewire_server.api.deps import SESSION_USER_KEY, OptionalUser, SessionDep
from hivewire_server.errors import DomainError, Forbidden
from hivewire_server.models import User

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
router = APIRouter(include_in_schema=False)


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(24)
        request.session["csrf"] = token
    return token


def check_csrf(request: Request, submitted: str) -> None:
    if not secrets.compare_digest(submitted, str(request.session.get("csrf", ""))):
        raise Forbidden("the form expired; reload the page and try again", code="bad_csrf")


def safe_next(target: str) -> str:
    """Only same-site paths: an open redirect would let a phishing link bounce through this server."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


def render(request: Request, name: str, user: User | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    providers = request.app.state.oauth_providers
    return templates.TemplateResponse(
        request,
        name,
        {"user": user, "csrf": csrf_token(request), "providers": providers, **context},
        status_code=status_code,
    )


@router.get("/")
async def index(request: Request, user: OptionalUser, session: SessionDep) -> Response:
    return render(request, "index.html", user, runs=await runs.list_runs(session, user=user))


@router.get("/login")
async def login_page(request: Request, user: OptionalUser, next: str = "/") -> Response:
    return render(request, "login.html", user, next=safe_next(next))


@router.post("/login")
async def login_form(
    request: Request,
    session: SessionDep,
    email: str = Form(max_length=320),
    password: str = Form(max_length=1024),
    csrf: str = Form(max_length=100),
    next: str = Form(default="/", max_length=2000),
) -> Response:
    check_csrf(request, csrf)
    try:
        user = await accounts.authenticate(session, email=email, password=password)
    except DomainError as exc:
        return render(request, "login.html", None, status_code=401, next=safe_next(next), error=exc.message)
    request.session.clear()
    request.session[SESSION_USER_KEY] = user.id
    return RedirectResponse(safe_next(next), status_code=303)


@router.post("/logout")
async def logout_form(request: Request, csrf: str = Form(max_length=100)) -> Response:
    check_csrf(request, csrf)
    request.session.clear()
    return RedirectResponse("/", status_code=303)


@router.get("/device")
async def device_page(request: Request, user: OptionalUser, user_code: str = "") -> Response:
    if user is None:
        target = f"/device?user_code={user_code[:16]}" if user_code else "/device"
        return RedirectResponse(f"/login?next={target}", status_code=303)
    return render(request, "device.html", user, user_code=user_code[:16])


@router.post("/device")
async def device_decision(
    request: Request,
    user: OptionalUser,
    session: SessionDep,
    user_code: str = Form(max_length=16),
    decision: str = Form(pattern="^(approve|deny)$"),
    csrf: str = Form(max_length=100),
) -> Response:
    if user is None:
        return RedirectResponse("/login?next=/device", status_code=303)
    check_csrf(request, csrf)
    try:
        await device_flow.decide(session, user=user, user_code=user_code, approve=decision == "approve")
    except DomainError as exc:
        return render(request, "device.html", user, status_code=400, user_code=user_code, error=exc.message)
    message = "Device approved: you can close this page." if decision == "approve" else "Sign-in denied."
    return render(request, "device.html", user, done=True, message=message)
