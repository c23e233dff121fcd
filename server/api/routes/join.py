"""Join a run (peer certificate, ICE servers, initial peers) and renew the certificate."""

from __future__ import annotations

from fastapi import APIRouter

from hivewire_server import joining, runs
from hivewire_server.api.deps import CurrentUser, HubDep, SessionDep, SettingsDep
from hivewire_server.schemas import JoinRequest, JoinResponse, RenewRequest

router = APIRouter(prefix="/api/runs", tags=["join"])


@router.post("/{slug}/join")
async def join(
    slug: str, body: JoinRequest, user: CurrentUser, session: SessionDep, settings: SettingsDep, hub: HubDep
) -> JoinResponse:
    run = await runs.get_run(session, slug=slug, user=user)
    response = await joining.join(session, settings=settings, run=run, user=user, peer_key=body.peer_key)
    # Live peers are those connected to signaling now, on any replica: a bare join (the doctor's, say)
    # does not make a peer live.
    response.initial_peers = await hub.sample(run.slug, exclude=response.peer_id)
    return response


@router.post("/{slug}/renew")
async def renew(
    slug: str, body: RenewRequest, user: CurrentUser, session: SessionDep, settings: SettingsDep, hub: HubDep
) -> JoinResponse:
    run = await runs.get_run(session, slug=slug, user=user)
    response = await joining.renew(session, settings=settings, run=run, user=user, certificate=body.certificate)
    response.initial_peers = await hub.sample(run.slug, exclude=response.peer_id)
    return response
