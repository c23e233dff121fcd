"""Local accounts (email + argon2 password) and the browser session cookie."""

from __future__ import annotations

from fastapi import APIRouter, Request

from hivewire_server import accounts
from hivewire_server.api.deps import SESSION_USER_KEY, CurrentUser, SessionDep
from hivewire_server.schemas import LoginRequest, SignupRequest, UserPublic

router = APIRouter(prefix="/api", tags=["auth"])


@router.post("/auth/signup", status_code=201)
async def signup(body: SignupRequest, request: Request, session: SessionDep) -> UserPublic:
    user = await accounts.create_local_user(
        session, email=body.email, password=body.password, display_name=body.display_name
    )
    request.session.clear()
    request.session[SESSION_USER_KEY] = user.id
    return UserPublic.model_validate(user)


@router.post("/auth/login")
async def login(body: LoginRequest, request: Request, session: SessionDep) -> UserPublic:
    user = await accounts.authenticate(session, email=body.email, password=body.password)
    request.session.clear()  # a fresh session: no fixation of a pre-login session
    request.session[SESSION_USER_KEY] = user.id
    return UserPublic.model_validate(user)


@router.post("/auth/logout", status_code=204)
async def logout(request: Request) -> None:
    request.session.clear()


@router.get("/me")
async def me(user: CurrentUser) -> UserPublic:
    return UserPublic.model_validate(user)
