"""Live updates of a run page over server-sent events: `GET /runs/{slug}/events`.

Each stream sends the run's progress and leaderboard every few seconds when they changed (a comment line
otherwise, which is also how a closed client is noticed). Streams of one run share one snapshot per poll, so
the database sees one set of queries per run however many pages are open.
Streams are bounded per process and end after a while: EventSource reconnects by itself, and a server that
shuts down never waits long for an open page."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from hivewire_server import leaderboard, runs
from hivewire_server.api.deps import OptionalUser, SessionDep
from hivewire_server.dashboard import overview
from hivewire_server.models import Run

router = APIRouter(include_in_schema=False)

POLL_SECONDS = 2.0
MAX_STREAMS = 200
STREAM_LIFETIME_SECONDS = 300.0
RETRY_MILLISECONDS = 3000


class StreamSlots:
    """Open streams, counted (a page past the limit is told to come back later: 503, Retry-After), and the
    latest snapshot of each run they show, with its monotonic time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.snapshots: dict[int, tuple[float, str]] = {}

    def take(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1
        if not self.open:
            self.snapshots.clear()  # nobody watches: forget runs that may be gone


def _slots(request: Request) -> StreamSlots:
    state = request.app.state
    if not hasattr(state, "dashboard_streams"):
        state.dashboard_streams = StreamSlots(MAX_STREAMS)
    return state.dashboard_streams  # type: ignore[no-any-return]


async def snapshot(request: Request, run: Run, slots: StreamSlots) -> str:
    """The run's progress and leaderboard as JSON: the shared one while it is fresh, else read anew in a
    session of its own (streams outlive the request's session)."""
    taken, cached = slots.snapshots.get(run.id, (float("-inf"), ""))
    if time.monotonic() - taken < POLL_SECONDS:
        return cached
    live_seconds = request.app.state.settings.peer_live_seconds
    async with request.app.state.sessions() as session:
        now = await overview.progress(session, run=run, live_seconds=live_seconds)
        rows = await leaderboard.leaderboard(session, run=run)
    text = json.dumps({"progress": now.as_json(), "leaderboard": [row.model_dump() for row in rows]})
    slots.snapshots[run.id] = (time.monotonic(), text)
    return text


async def _events(request: Request, run: Run, slots: StreamSlots) -> AsyncIterator[str]:
    try:
        yield f"retry: {RETRY_MILLISECONDS}\n\n"
        last = ""
        deadline = time.monotonic() + STREAM_LIFETIME_SECONDS
        while time.monotonic() < deadline:
            current = await snapshot(request, run, slots)
            yield f"event: update\ndata: {current}\n\n" if current != last else ": unchanged\n\n"
            last = current
            await asyncio.sleep(POLL_SECONDS)
    finally:
        slots.release()


@router.get("/runs/{slug}/events")
async def run_events(slug: str, request: Request, user: OptionalUser, session: SessionDep) -> Response:
    run = await runs.get_run(session, slug=slug, user=user)
    await session.close()  # the stream reads with sessions of its own; don't hold this one for minutes
    slots = _slots(request)
    if not slots.take():
        return Response("too many live pages open; retrying", status_code=503, headers={"Retry-After": "10"})
    return StreamingResponse(
        _events(request, run, slots),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
