"""Sign-in through OAuth 2 / OpenID Connect providers (authlib). Placeholder wiring: no providers yet."""

from __future__ import annotations

from fastapi import FastAPI

from hivewire_server.core.config import Settings


def install(app: FastAPI, settings: Settings) -> None:
    app.state.oauth_providers = []
