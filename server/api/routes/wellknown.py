"""The server's certificate-signing keys, for peers that verify each other's certificates."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from hivewire_server.api.deps import SessionDep, SettingsDep
from hivewire_server.core import keys

router = APIRouter(tags=["keys"])


@router.get("/.well-known/jwks.json")
async def jwks(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    await keys.active_key(session)  # a fresh server publishes its first key before any join
    published = await keys.published_keys(session, settings.certificate_lifetime_seconds)
    return JSONResponse(keys.jwks(published), headers={"Cache-Control": "public, max-age=300"})
