"""Server-rendered pages: sign-in and sign-up, the device-approval page that `hivewire login` sends people to,
and the routers of the run, account and live-update pages (mounted by server.main as one router)."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from hivewire_server import accounts, device_flow, runs
from hivewire_server.api.deps import SESSION_USER_KEY, OptionalUser, SessionDep
from hivewire_server.dashboard import account_pages, live, run_pages
from hivewire_server.dashboard.web import check_csrf, render, safe_next
from hivewire_server.errors import Conflict, DomainError
from hivewire_server.schemas import SignupRequest

__all__ = ["router", "safe_next"]

router = APIRouter(include_in_schema=False)
for _pages in (run_pages.router, account_pages.router, live.router):
    router.include_router(_pages)


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


@router.get("/signup")
async def signup_page(request: Request, user: OptionalUser, next: str = "/") -> Response:
    return render(request, "signup.html", user, next=safe_next(next), values={}, errors={})


@router.post("/signup")
async def signup_form(
    request: Request,
    session: SessionDep,
    email: str = Form(default="", max_length=320),
    display_name: str = Form(default="", max_length=100),
    password: str = Form(default="", max_length=1024),
    csrf: str = Form(max_length=100),
    next: str = Form(default="/", max_length=2000),
) -> Response:
    """Local accounts, checked like the API's signup; errors are shown next to the field they concern."""
    check_csrf(request, csrf)
    values = {"email": email, "display_name": display_name}
    errors: dict[str, str] = {}
    try:
        body = SignupRequest(email=email, password=password, display_name=display_name.strip())
        user = await accounts.create_local_user(
            session, email=body.email, password=body.password, display_name=body.display_name
        )
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "email"
            errors.setdefault(field, _signup_message(field, error["msg"]))
        try:  # say everything that is wrong at once, the password's strength included
            accounts.check_password_strength(password, email=email)
        except DomainError as weak:
            errors.setdefault("password", weak.message)
    except DomainError as exc:
        errors["email" if isinstance(exc, Conflict) else "password"] = exc.message
    if errors:
        return render(request, "signup.html", None, next=safe_next(next), values=values, errors=errors)
    request.session.clear()
    request.session[SESSION_USER_KEY] = user.id
    return RedirectResponse(safe_next(next), status_code=303)


def _signup_message(field: str, message: str) -> str:
    return {
        "email": "enter an email address such as ada@example.org",
        "display_name": "enter a name of 1 to 100 characters; it is shown on leaderboards",
        "password": "enter a password",
    }.get(field, message)


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
