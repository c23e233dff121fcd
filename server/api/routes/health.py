"""Liveness and database reachability, for load balancers and `docker compose` health checks."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from hivewire_server.api.deps import SessionDep

router = APIRouter(tags=["health"])
log = logging.getLogger("hivewire.health")


@router.get("/healthz")
async def healthz(session: SessionDep) -> JSONResponse:
    try:
        await session.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as exc:
        log.warning("database unreachable: %s", exc)
        return JSONResponse({"status": "degraded", "database": "unreachable"}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok"})
