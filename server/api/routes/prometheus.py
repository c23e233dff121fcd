"""`GET /metrics`: this replica's Prometheus metrics (requests, signaling peers, reports, receipts)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from hivewire_server.api.deps import HubDep
from hivewire_server.metrics import CONTENT_TYPE

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=PlainTextResponse)
async def exposition(request: Request, hub: HubDep) -> PlainTextResponse:
    text = request.app.state.metrics.render(signaling_peers=hub.connected_count())
    return PlainTextResponse(text, media_type=CONTENT_TYPE)
