"""`GET /api/runs/{slug}/signal`: the signaling WebSocket (docs/protocol.md). Authenticates, then hands the
socket to a PeerConnection registered with the hub. Domain errors become close codes here and only here."""

from __future__ import annotations

import logging

from fastapi import APIRouter, WebSocket
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from hivewire_server.core.config import Settings
from hivewire_server.errors import Banned, DomainError, NotFound
from hivewire_server.signaling import admission, protocol
from hivewire_server.signaling.connection import Closing, PeerConnection, Reader, send_close
from hivewire_server.signaling.hub import Hub
from hivewire_server.signaling.limits import AUTH_TIMEOUT_SECONDS, Limits
from hivewire_server.signaling.protocol import CloseCode

log = logging.getLogger("hivewire.signaling")
router = APIRouter(tags=["signaling"])


def close_code_for(error: DomainError) -> CloseCode:
    if isinstance(error, Banned):
        return CloseCode.BANNED
    if error.code == "expired_certificate":
        return CloseCode.EXPIRED
    if error.code == "other_run" or isinstance(error, NotFound):
        return CloseCode.OTHER_RUN
    return CloseCode.UNAUTHENTICATED


async def _certificate(websocket: WebSocket, reader: Reader) -> str | None:
    """The certificate from the bearer header or the first message; None if the peer left first."""
    header = websocket.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Closing(CloseCode.UNAUTHENTICATED, "expected 'Authorization: Bearer <peer certificate>'")
        return token.strip()
    try:
        text = await reader.next(within_seconds=AUTH_TIMEOUT_SECONDS)
    except TimeoutError:
        raise Closing(CloseCode.UNAUTHENTICATED, f"no auth message within {AUTH_TIMEOUT_SECONDS:.0f} s") from None
    if text is None:
        return None
    try:
        message = protocol.parse(text)
    except protocol.InvalidMessage:
        message = None
    if not isinstance(message, protocol.Auth):
        raise Closing(CloseCode.UNAUTHENTICATED, 'authenticate first: {"type": "auth", "certificate": "…"}')
    return message.certificate


@router.websocket("/api/runs/{slug}/signal")
async def signal(websocket: WebSocket, slug: str) -> None:
    settings: Settings = websocket.app.state.settings
    sessions: async_sessionmaker[AsyncSession] = websocket.app.state.sessions
    hub: Hub = websocket.app.state.hub
    limits = Limits.from_settings(settings)
    client = websocket.client.host if websocket.client else "?"
    await websocket.accept()  # before any check, so that a refusal carries a close code and a reason
    reader = Reader(websocket, limits)
    try:
        certificate = await _certificate(websocket, reader)
        if certificate is None:
            return
        async with sessions() as session:
            identity = await admission.authenticate(session, settings=settings, slug=slug, certificate=certificate)
    except (Closing, DomainError) as exc:
        code, reason = (exc.code, exc.reason) if isinstance(exc, Closing) else (close_code_for(exc), exc.message)
        log.info("refused signaling in run %s from %s: %d %s", slug, client, code, reason)
        await send_close(websocket, code, reason)
        return

    async def touch() -> None:
        async with sessions() as session:
            await admission.mark_seen(session, run_id=identity.run_id, peer_id=identity.peer_id)

    connection = PeerConnection(
        websocket,
        reader,
        identity=identity,
        hub=hub,
        limits=limits,
        touch=touch,
        touch_every_seconds=settings.peer_live_seconds / 3,
    )
    welcome = protocol.Welcome(
        peer_id=identity.peer_id,
        peers=await hub.sample(slug, exclude=identity.peer_id),
        heartbeat_seconds=limits.heartbeat_seconds,
        limits=protocol.WelcomeLimits(
            max_message_bytes=limits.max_message_bytes,
            messages_per_second=limits.messages_per_second,
            burst=limits.burst,
        ),
    )
    connection.deliver(protocol.encode(welcome))
    await hub.register(connection)
    log.info("peer %s (user %d) connected to run %s from %s", identity.peer_id, identity.user_id, slug, client)
    try:
        await touch()
        async with sessions() as session:  # a ban committed while this peer was being admitted
            banned = await admission.is_banned(session, run_id=identity.run_id, user_id=identity.user_id)
        if banned:
            await connection.close(CloseCode.BANNED, "the user is banned from this run")
        else:
            await connection.serve()
    finally:
        await hub.unregister(connection)
        left = "disconnected" if connection.close_code is None else f"closed with {int(connection.close_code)}"
        log.info("peer %s left run %s (%s)", identity.peer_id, slug, left)
