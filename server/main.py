"""The app factory: settings → database → middleware → routers → dashboard."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware

import hivewire_server.dashboard
from hivewire_server.api import errors
from hivewire_server.api.middleware import AccessLogMiddleware, BodyLimitMiddleware
from hivewire_server.api.routes import (
    accounting,
    auth,
    device,
    downloads,
    health,
    join,
    prometheus,
    runs,
    signaling,
    tokens,
    wellknown,
)
from hivewire_server.auth import oidc
from hivewire_server.client_wheels import ClientWheels
from hivewire_server.core.config import Settings
from hivewire_server.core.db import create_engine, session_factory
from hivewire_server.dashboard import routes as pages
from hivewire_server.metrics import ServerMetrics
from hivewire_server.signaling.hub import Hub

SESSION_COOKIE = "hivewire_session"  # its own name: the OpenID provider may share the host's cookie jar
SESSION_MAX_AGE_SECONDS = 14 * 24 * 3600
log = logging.getLogger("hivewire.server")


def _announce_client_wheel(wheels: ClientWheels) -> None:
    """Say at start-up what the join page will tell volunteers to install, so a bad CLIENT_WHEEL_DIR shows."""
    if wheels.directory is None:
        return
    newest = wheels.newest()
    if newest is None:
        log.warning(
            "CLIENT_WHEEL_DIR %s holds no hivewire-*.whl; join pages say `pip install hivewire` instead",
            wheels.directory,
        )
    else:
        log.info("serving client wheel %s (sha256 %s) at /downloads", newest.filename, newest.sha256)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        app.state.hub = await Hub.start(settings)
        _announce_client_wheel(app.state.client_wheels)
        try:
            yield
        finally:
            await app.state.hub.close()
            await engine.dispose()

    app = FastAPI(title="Hivewire", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = ServerMetrics()
    app.state.client_wheels = ClientWheels(Path(settings.client_wheel_dir) if settings.client_wheel_dir else None)
    errors.install(app)
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.session_secret.get_secret_value(),
        session_cookie=SESSION_COOKIE,
        max_age=SESSION_MAX_AGE_SECONDS,
        same_site="lax",
        https_only=settings.base_url.startswith("https://"),
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(AccessLogMiddleware, metrics=app.state.metrics)
    for router in (
        health.router,
        auth.router,
        tokens.router,
        device.router,
        downloads.router,
        runs.router,
        join.router,
        signaling.router,
        wellknown.router,
        accounting.router,
        prometheus.router,
    ):
        app.include_router(router)
    oidc.install(app, settings)
    app.include_router(pages.router)
    static_dir = f"{hivewire_server.dashboard.__path__[0]}/static"
    app.mount("/static", StaticFiles(directory=static_dir), name="static")
    return app
