"""FastAPI dependencies: the database session, settings, and who is asking."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.accounts import user_for_api_token
from hivewire_server.core.config import Settings
from hivewire_server.core.security import API_TOKEN_PREFIX
from hivewire_server.errors import Unauthenticated
from hivewire_server.models import User
from hivewire_server.runs import require_organizer
from hivewire_server.signaling.hub import Hub

SESSION_USER_KEY = "uid"


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _hub(request: Request) -> Hub:
    return request.app.state.hub  # type: ignore[no-any-return]


SessionDep = Annotated[AsyncSession, Depends(_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]
HubDep = Annotated[Hub, Depends(_hub)]


async def _optional_user(request: Request, session: SessionDep) -> User | None:
    """A bearer API token (CLI) or the browser session cookie; a bad bearer token is an error, not anonymous."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.startswith(API_TOKEN_PREFIX) or len(token) > 200:
            raise Unauthenticated("expected 'Authorization: Bearer hw_…' with an API token", code="bad_token")
        user = await user_for_api_token(session, token.strip())
        if user is None:
            raise Unauthenticated("this API token is unknown or revoked; run `hivewire login` again", code="bad_token")
        return user
    user_id = request.session.get(SESSION_USER_KEY)
    if isinstance(user_id, int):
        return await session.get(User, user_id)
    return None


async def _current_user(user: Annotated[User | None, Depends(_optional_user)]) -> User:
    if user is None:
        raise Unauthenticated("sign in first (browser) or pass an API token (CLI)", code="not_signed_in")
    return user


async def _current_organizer(user: Annotated[User, Depends(_current_user)]) -> User:
    require_organizer(user)
    return user


OptionalUser = Annotated[User | None, Depends(_optional_user)]
CurrentUser = Annotated[User, Depends(_current_user)]
CurrentOrganizer = Annotated[User, Depends(_current_organizer)]
