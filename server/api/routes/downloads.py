"""The volunteer client's wheels, for `pip install` straight from this server (see client_wheels.py).

Sync routes on purpose: listing and hashing touch the disk, so FastAPI runs them in its threadpool."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from hivewire_server.api.deps import SettingsDep
from hivewire_server.client_wheels import ClientWheels
from hivewire_server.errors import NotFound
from hivewire_server.schemas import ClientWheelPublic, ClientWheelsPublic

router = APIRouter(tags=["downloads"])


def _wheels(request: Request) -> ClientWheels:
    return request.app.state.client_wheels  # type: ignore[no-any-return]


WheelsDep = Annotated[ClientWheels, Depends(_wheels)]


@router.get("/downloads")
def list_wheels(wheels: WheelsDep, settings: SettingsDep) -> ClientWheelsPublic:
    data = [
        ClientWheelPublic(
            filename=wheel.filename,
            version=str(wheel.version),
            size=wheel.size,
            sha256=wheel.sha256,
            url=f"{settings.base_url}/downloads/{wheel.filename}",
        )
        for wheel in wheels.available()
    ]
    return ClientWheelsPublic(data=data, count=len(data))


@router.get("/downloads/{filename}", response_class=FileResponse)
def download_wheel(filename: str, wheels: WheelsDep) -> FileResponse:
    wheel = wheels.get(filename)
    if wheel is None:
        raise NotFound(f"no client wheel named {filename[:200]!r} here; GET /downloads lists them", code="not_found")
    digest = base64.b64encode(bytes.fromhex(wheel.sha256)).decode()
    return FileResponse(
        wheel.path,
        media_type="application/octet-stream",
        filename=wheel.filename,
        # RFC 9530: lets a client check the bytes it got against the listing's hash.
        headers={"Repr-Digest": f"sha-256=:{digest}:", "Cache-Control": "public, max-age=300"},
    )
