"""The leaderboard's ranking, the run's time series and the Prometheus exposition, as their readers see them."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from fastapi.testclient import TestClient

from tests.conftest import Account, new_user
from tests.server._accounting import joined, post_receipt, post_reports, receipt

# One sample line of the text exposition format: name, optional {labels}, value.
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample keyed by name and labels; fails on any line that is not a comment or a sample."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name, labels, value = match.groups()
        assert name in types, f"{name} has no TYPE line before it"
        samples[(name, frozenset(LABEL.findall(labels or "")))] = float(value)
    assert text.endswith("\n")
    return samples


def test_leaderboard_ranks_by_verified_samples_and_ties_share_a_rank(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    wendy = new_user(client, "wendy")
    olivia, victor, w = (joined(client, account, run_slug) for account in (organizer, volunteer, wendy))
    post_receipt(client, run_slug, olivia, receipt(run_slug, [(olivia, 100), (victor, 400), (w, 100)]))
    post_reports(client, run_slug, w, [w.report(samples=999)])

    rows = client.get(f"/api/runs/{run_slug}/leaderboard").json()["data"]
    assert [(row["user_id"], row["rank"]) for row in rows] == [(volunteer.id, 1), (wendy.id, 2), (organizer.id, 2)]
    assert rows[1]["reported_samples"] == 999 and rows[1]["rounds"] == 1
    assert set(rows[0]) == {
        "rank", "user_id", "display_name", "verified_samples", "reported_samples", "online_seconds", "rounds"
    }  # fmt: skip


def test_metrics_buckets_hold_mean_loss_global_throughput_and_active_peers(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    alice, bob = joined(client, organizer, run_slug), joined(client, volunteer, run_slug)
    origin = (int(time.time()) // 60 - 2) * 60  # the start of a minute, two minutes ago
    post_reports(client, run_slug, alice, [alice.report(samples=600, loss=3.0, time=origin + 1.0)])
    post_reports(client, run_slug, bob, [bob.report(samples=1200, loss=2.0, time=origin + 2.0)])
    post_reports(client, run_slug, bob, [bob.report(samples=60, loss=1.0, time=origin + 70.0)])

    since = datetime.fromtimestamp(origin, UTC).isoformat()
    response = client.get(f"/api/runs/{run_slug}/metrics", params={"since": since, "bucket_seconds": 60})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["bucket_seconds"] == 60 and body["count"] == 2
    first, second = body["data"]
    assert datetime.fromisoformat(first["start"]).timestamp() == origin
    assert (first["loss_mean"], first["samples_per_second"], first["active_peers"], first["reports"]) == (
        2.5, 30.0, 2, 2
    )  # fmt: skip
    assert datetime.fromisoformat(second["start"]).timestamp() == origin + 60
    assert (second["loss_mean"], second["samples_per_second"], second["active_peers"]) == (1.0, 1.0, 1)

    assert client.get(f"/api/runs/{run_slug}/metrics").json()["count"] == 2  # the last hour by default
    too_many = client.get(f"/api/runs/{run_slug}/metrics", params={"since": "2000-01-01T00:00:00Z"})
    assert too_many.status_code == 400 and too_many.json()["code"] == "too_many_buckets"
    assert client.get("/api/runs/no-such-run/leaderboard").status_code == 404


def test_prometheus_exposition_counts_requests_reports_and_receipts(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    alice, bob = joined(client, organizer, run_slug), joined(client, volunteer, run_slug)
    post_reports(client, run_slug, bob, [bob.report(), bob.report(samples=-1)])
    post_receipt(client, run_slug, alice, receipt(run_slug, [(alice, 1), (bob, 2)]))
    client.post(f"/api/runs/{run_slug}/reports", json={"reports": []})  # no certificate

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(response.text)

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("hivewire_reports_total", outcome="accepted") == 1
    assert value("hivewire_reports_total", outcome="refused") == 1
    assert value("hivewire_reports_total", outcome="batch_refused") == 1
    assert value("hivewire_receipts_total", outcome="stored") == 1
    assert value("hivewire_signaling_peers") == 0
    route = "/api/runs/{slug}/reports"
    assert value("hivewire_http_requests_total", route=route, method="POST", status="200") == 1
    assert value("hivewire_http_requests_total", route=route, method="POST", status="401") == 1
    assert value("hivewire_http_requests_total", route="/api/runs/{slug}/join", method="POST", status="200") == 2
