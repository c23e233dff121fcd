"""RFC 8628 endpoints. The token endpoint speaks OAuth's error format; the others the API's."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request

from hivewire_server import device_flow
from hivewire_server.api.deps import CurrentUser, SessionDep, SettingsDep
from hivewire_server.device_flow import DeviceGrantError
from hivewire_server.schemas import DeviceApproveRequest, DeviceCodeResponse, DeviceTokenResponse

router = APIRouter(prefix="/api/device", tags=["device"])


async def _form_or_json(request: Request) -> dict[str, Any]:
    """OAuth clients post forms (RFC 6749 §4.1.3); scripts often post JSON. Accept both, strings only."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    try:
        if content_type == "application/json":
            data = json.loads(await request.body())
        else:
            data = dict(await request.form())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DeviceGrantError("invalid_request", "the body is neither a form nor JSON") from exc
    if not isinstance(data, dict) or not all(isinstance(value, str) for value in data.values()):
        raise DeviceGrantError("invalid_request", "every parameter must be a string")
    return data


@router.post("/code")
async def device_code(request: Request, session: SessionDep, settings: SettingsDep) -> DeviceCodeResponse:
    data = await _form_or_json(request)
    issued = await device_flow.issue_code(session, client_id=data.get("client_id", ""))
    verification_uri = f"{settings.base_url}/device"
    return DeviceCodeResponse(
        device_code=issued.device_code,
        user_code=issued.user_code,
        verification_uri=verification_uri,
        verification_uri_complete=f"{verification_uri}?user_code={issued.user_code}",
        expires_in=issued.expires_in,
        interval=issued.interval,
    )


@router.post("/token")
async def device_token(request: Request, session: SessionDep) -> DeviceTokenResponse:
    data = await _form_or_json(request)
    token = await device_flow.exchange(
        session,
        grant_type=data.get("grant_type", ""),
        device_code=data.get("device_code", ""),
        client_id=data.get("client_id", ""),
    )
    return DeviceTokenResponse(access_token=token)


@router.post("/approve")
async def approve(body: DeviceApproveRequest, user: CurrentUser, session: SessionDep) -> dict[str, str]:
    row = await device_flow.decide(session, user=user, user_code=body.user_code, approve=body.approve)
    return {"status": row.status}
