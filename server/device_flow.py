"""The OAuth 2.0 Device Authorization Grant (RFC 8628) behind `hivewire login`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.accounts import create_api_token
from hivewire_server.core.security import sha256_hex
from hivewire_server.core.timeutil import utcnow
from hivewire_server.errors import InvalidInput, NotFound
from hivewire_server.models import DeviceCode, User

CLIENT_ID = "hivewire-cli"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
CODE_LIFETIME_SECONDS = 600
POLL_INTERVAL_SECONDS = 5
SLOW_DOWN_STEP_SECONDS = 5  # RFC 8628 §3.5
# No vowels (no words), no look-alikes: 20^8 ≈ 2.6e10 codes, typed by a person.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"


class DeviceGrantError(Exception):
    """An RFC 6749/8628 token-endpoint error; `error` is the code the client switches on."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass(frozen=True)
class IssuedCode:
    device_code: str
    user_code: str
    expires_in: int
    interval: int


def normalize_user_code(text: str) -> str:
    """People type codes as they like: case and dashes or spaces do not matter."""
    code = "".join(ch for ch in text.upper() if ch not in "- ")
    if len(code) != 8 or any(ch not in USER_CODE_ALPHABET for ch in code):
        raise InvalidInput("a code is 8 letters like BCDF-GHJK", code="invalid_user_code")
    return code


def display_user_code(code: str) -> str:
    return f"{code[:4]}-{code[4:]}"


async def issue_code(session: AsyncSession, *, client_id: str) -> IssuedCode:
    if client_id != CLIENT_ID:
        raise DeviceGrantError("invalid_client", f"unknown client_id; expected {CLIENT_ID!r}")
    device_code = secrets.token_urlsafe(32)
    while True:
        user_code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
        if await session.scalar(select(DeviceCode.id).where(DeviceCode.user_code == user_code)) is None:
            break
    session.add(
        DeviceCode(
            device_code_hash=sha256_hex(device_code),
            user_code=user_code,
            client_id=client_id,
            interval_seconds=POLL_INTERVAL_SECONDS,
            expires_at=utcnow() + timedelta(seconds=CODE_LIFETIME_SECONDS),
        )
    )
    await session.commit()
    return IssuedCode(device_code, display_user_code(user_code), CODE_LIFETIME_SECONDS, POLL_INTERVAL_SECONDS)


async def pending_code(session: AsyncSession, *, user_code: str) -> DeviceCode:
    row = await session.scalar(select(DeviceCode).where(DeviceCode.user_code == normalize_user_code(user_code)))
    if row is None or row.expires_at <= utcnow():
        raise NotFound("this code is unknown or has expired; run `hivewire login` again", code="unknown_user_code")
    if row.status != "pending":
        raise InvalidInput(f"this code was already {row.status}", code="code_not_pending")
    return row


async def decide(session: AsyncSession, *, user: User, user_code: str, approve: bool) -> DeviceCode:
    row = await pending_code(session, user_code=user_code)
    row.status = "approved" if approve else "denied"
    row.user_id = user.id
    await session.commit()
    return row


async def exchange(session: AsyncSession, *, grant_type: str, device_code: str, client_id: str) -> str:
    """One poll of the token endpoint: an API token once approved, else a DeviceGrantError."""
    if grant_type != GRANT_TYPE:
        raise DeviceGrantError("unsupported_grant_type", f"grant_type must be {GRANT_TYPE}")
    if client_id != CLIENT_ID:
        raise DeviceGrantError("invalid_client", f"unknown client_id; expected {CLIENT_ID!r}")
    row = await session.scalar(select(DeviceCode).where(DeviceCode.device_code_hash == sha256_hex(device_code)))
    if row is None or row.status == "used":
        raise DeviceGrantError("invalid_grant", "unknown or already used device_code")
    now = utcnow()
    if row.expires_at <= now:
        raise DeviceGrantError("expired_token", "the code expired; run `hivewire login` again")
    if row.status == "denied":
        raise DeviceGrantError("access_denied", "the sign-in was denied in the browser")
    if row.status == "pending":
        too_fast = row.last_polled_at is not None and (now - row.last_polled_at).total_seconds() < row.interval_seconds
        row.last_polled_at = now
        if too_fast:
            row.interval_seconds += SLOW_DOWN_STEP_SECONDS
            await session.commit()
            raise DeviceGrantError("slow_down", f"poll at most every {row.interval_seconds} seconds")
        await session.commit()
        raise DeviceGrantError("authorization_pending", "waiting for approval in the browser")
    user = await session.get(User, row.user_id)
    if user is None:
        raise DeviceGrantError("invalid_grant", "the approving user no longer exists")
    row.status = "used"  # one token per approval, even if polled again
    _, token = await create_api_token(session, user=user, name=f"hivewire login {now:%Y-%m-%d %H:%M}")
    return token
