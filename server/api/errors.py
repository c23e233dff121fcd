"""The one place where errors become HTTP responses: always JSON `{detail, code}`, never a bare 500 page."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from hivewire_server.device_flow import DeviceGrantError
from hivewire_server.errors import (
    Banned,
    Conflict,
    DomainError,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthenticated,
)

log = logging.getLogger("hivewire.api")

_STATUS: list[tuple[type[DomainError], int]] = [
    (Banned, 403),
    (Forbidden, 403),
    (Unauthenticated, 401),
    (NotFound, 404),
    (Conflict, 409),
    (InvalidInput, 400),
]


def status_for(error: DomainError) -> int:
    return next((status for kind, status in _STATUS if isinstance(error, kind)), 400)


def _describe(error: dict[str, object]) -> str:
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")  # type: ignore[attr-defined]
    return f"{location or 'body'}: {error.get('msg')}"


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
        return JSONResponse({"detail": exc.message, "code": exc.code}, status_code=status_for(exc), headers=headers)

    @app.exception_handler(DeviceGrantError)
    async def _device_grant(_: Request, exc: DeviceGrantError) -> JSONResponse:
        status = 401 if exc.error == "invalid_client" else 400
        return JSONResponse({"error": exc.error, "error_description": exc.description}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(error.get("type") == "json_invalid" for error in errors):
            return JSONResponse({"detail": "the request body is not valid JSON", "code": "malformed_json"}, 400)
        details = [_describe(error) for error in errors[:10]]
        return JSONResponse({"detail": "; ".join(details), "code": "invalid_request"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        return JSONResponse({"detail": exc.detail, "code": code}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; the operator's log has the details", "code": "internal"}, 500)
