"""Users, local passwords, provider identities and API tokens."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.core.security import hash_password, new_api_token, sha256_hex, verify_password
from hivewire_server.core.timeutil import utcnow
from hivewire_server.errors import Conflict, InvalidInput, NotFound, Unauthenticated
from hivewire_server.models import ApiToken, Identity, User

MIN_PASSWORD_LENGTH = 10
_COMMON_PASSWORDS = frozenset(
    {"password123", "1234567890", "qwertyuiop", "iloveyou123", "password1234", "letmein1234", "0123456789"}
)


def check_password_strength(password: str, *, email: str) -> None:
    """A floor, not a meter: long enough, not a well-known password, not the email itself."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"password must have at least {MIN_PASSWORD_LENGTH} characters", code="weak_password")
    lowered = password.lower()
    if lowered in _COMMON_PASSWORDS or lowered == email.lower() or len(set(password)) < 4:
        raise InvalidInput("password is too easy to guess; choose a longer, less common one", code="weak_password")


async def _is_first_user(session: AsyncSession) -> bool:
    return (await session.scalar(select(func.count()).select_from(User))) == 0


async def create_local_user(session: AsyncSession, *, email: str, password: str, display_name: str) -> User:
    email = email.lower()
    check_password_strength(password, email=email)
    if await session.scalar(select(User.id).where(User.email == email)) is not None:
        raise Conflict("an account with this email exists already; sign in instead", code="email_taken")
    user = User(
        email=email,
        display_name=display_name.strip(),
        password_hash=hash_password(password),
        is_organizer=await _is_first_user(session),  # the first user of a fresh server organizes
    )
    session.add(user)
    try:
        await session.commit()
    except IntegrityError as exc:  # a concurrent signup with the same email won the race
        await session.rollback()
        raise Conflict("an account with this email exists already; sign in instead", code="email_taken") from exc
    return user


async def authenticate(session: AsyncSession, *, email: str, password: str) -> User:
    user = await session.scalar(select(User).where(User.email == email.lower()))
    if not verify_password(password, user.password_hash if user else None) or user is None:
        raise Unauthenticated("wrong email or password", code="bad_credentials")
    return user


async def user_for_identity(
    session: AsyncSession, *, provider: str, subject: str, email: str | None, display_name: str
) -> User:
    """The user linked to a provider account; the first sign-in creates the user and links the identity.

    An existing local account with the same email is not linked automatically: a provider's email claim
    is not proof of owning the local account."""
    identity = await session.scalar(select(Identity).where(Identity.provider == provider, Identity.subject == subject))
    if identity is not None:
        user = await session.get(User, identity.user_id)
        if user is None:
            raise NotFound("the linked user no longer exists")
        return user
    email = email.lower() if email else None
    if email and await session.scalar(select(User.id).where(User.email == email)) is not None:
        email = None  # keep the address with the account that already owns it
    user = User(email=email, display_name=display_name[:100] or provider, is_organizer=await _is_first_user(session))
    user.identities.append(Identity(provider=provider, subject=subject, email=email))
    session.add(user)
    await session.commit()
    return user


async def create_api_token(session: AsyncSession, *, user: User, name: str) -> tuple[ApiToken, str]:
    """Returns the row and the token itself, which is shown once and never stored."""
    token = new_api_token()
    row = ApiToken(user_id=user.id, name=name, token_hash=sha256_hex(token))
    session.add(row)
    await session.commit()
    return row, token


async def user_for_api_token(session: AsyncSession, token: str) -> User | None:
    row = await session.scalar(
        select(ApiToken).where(ApiToken.token_hash == sha256_hex(token), ApiToken.revoked_at.is_(None))
    )
    if row is None:
        return None
    row.last_used_at = utcnow()
    await session.commit()
    return await session.get(User, row.user_id)


async def list_api_tokens(session: AsyncSession, *, user: User) -> list[ApiToken]:
    return list(await session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)))


async def revoke_api_token(session: AsyncSession, *, user: User, token_id: int) -> ApiToken:
    row = await session.get(ApiToken, token_id)
    if row is None or row.user_id != user.id:
        raise NotFound(f"you have no API token with id {token_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        await session.commit()
    return row


async def make_organizer(session: AsyncSession, *, email: str) -> User:
    user = await session.scalar(select(User).where(User.email == email.lower()))
    if user is None:
        raise NotFound(f"no user with email {email}")
    user.is_organizer = True
    await session.commit()
    return user
