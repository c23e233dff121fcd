"""What every page shares: templates, the per-session CSRF token, safe redirects, and error pages.

Forms carry the CSRF token; the session cookie is also SameSite=Lax. A form with mistakes comes back as a
200 page with the errors by the fields (a 4xx document is a console error in every browser); a request that
cannot be served becomes an error page with the status the API would give (api/errors.py decides it)."""

from __future__ import annotations

import secrets
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from hivewire_server.api.errors import status_for
from hivewire_server.errors import DomainError, Forbidden
from hivewire_server.models import User


def _when(value: datetime | None) -> str:
    """UTC times as people read them; the raw ISO time goes into <time datetime=…>."""
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
templates.env.filters["when"] = _when
templates.env.filters["duration"] = _duration


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


def to_login(request: Request) -> RedirectResponse:
    """Pages that need an account send visitors to sign in and bring them back afterwards."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(safe_next(target), safe='/')}", status_code=303)


def render(request: Request, name: str, user: User | None, status_code: int = 200, **context: Any) -> HTMLResponse:
    providers = request.app.state.oauth_providers
    return templates.TemplateResponse(
        request,
        name,
        {
            "user": user,
            "csrf": csrf_token(request),
            "providers": providers,
            "flash": request.session.pop("flash", None),  # one-time notice after a form's redirect
            **context,
        },
        status_code=status_code,
    )


def error_page(request: Request, user: User | None, error: DomainError) -> HTMLResponse:
    return render(request, "error.html", user, status_code=status_for(error), message=error.message)
