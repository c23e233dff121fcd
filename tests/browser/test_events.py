"""The run page's event stream over real HTTP (no browser needed): a first snapshot at once, a bounded number
of open streams, and the slot freed when the client goes away."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx

from hivewire_server.dashboard.live import StreamSlots
from tests.browser.conftest import LiveServer

FREED_WITHIN_S = 6.0  # the stream notices a closed client at its next write: one poll (2 s) and some slack


def next_update(lines: Iterator[str]) -> dict[str, object]:
    """Reads on to the next `data:` line; the caller keeps the iterator (closing it would close the stream)."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line.removeprefix("data: "))  # type: ignore[no-any-return]
    raise AssertionError("the stream ended without an update")


def test_stream_sends_a_snapshot_is_bounded_and_frees_its_slot(live_server: LiveServer) -> None:
    slug = live_server.create_run("events-demo")
    slots = StreamSlots(limit=1)
    live_server.app.state.dashboard_streams = slots
    with httpx.Client(base_url=live_server.url, timeout=10.0) as http:
        with http.stream("GET", f"/runs/{slug}/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()  # held: a dropped line iterator closes the response
            update = next_update(lines)
            assert update["leaderboard"] == []
            assert update["progress"] == {
                "epoch": 0,
                "reported_samples": 0,
                "verified_samples": 0,
                "rounds": 0,
                "active_peers": 0,
                "samples_per_second": 0.0,
            }
            assert slots.open == 1
            refused = http.get(f"/runs/{slug}/events")
            assert refused.status_code == 503 and refused.headers["retry-after"] == "10"
        deadline = time.monotonic() + FREED_WITHIN_S
        while slots.open:
            assert time.monotonic() < deadline, "the stream kept its slot after the client left"
            time.sleep(0.1)
        assert http.get("/runs/unknown/events").status_code == 404
