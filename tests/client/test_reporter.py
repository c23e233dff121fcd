"""The reporter against the real server (uvicorn on a free loopback port, SQLite and PostgreSQL): reports written
while the server is down wait on disk, survive a client restart, arrive once it is back, and count once."""

from __future__ import annotations

import functools
import json
import math
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivewire.api import HivewireAPI
from hivewire.errors import ServerUnreachable
from hivewire.identity import PeerIdentity
from hivewire.reporter import (
    MAX_REPORTED_LINKS,
    LinkRate,
    LinkTypes,
    Reporter,
    ReporterConfig,
    ReportQueue,
    sign_receipt,
    sign_report,
)
from hivewire_server.core.config import Settings
from hivewire_server.main import create_app
from tests.client._fakes import raw_public
from tests.conftest import Account, make_settings

LOOPBACK = "127.0.0.1"
START_STOP_TIMEOUT_S = 10.0
LINKS = LinkTypes(host=1, srflx=2)


@pytest.fixture
def port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def settings(database_url: str, port: int) -> Settings:
    """The certificates' issuer is the address uvicorn listens on, before and after a restart."""
    return make_settings(database_url, public_url=f"http://{LOOPBACK}:{port}", stun_urls=[], turn_urls=[])


class LiveServer:
    """The real app under uvicorn in a thread, stopped and started again on the same port."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.settings = settings
        self.port = port
        self.url = f"http://{LOOPBACK}:{port}"
        self._running: tuple[uvicorn.Server, threading.Thread] | None = None

    @property
    def running(self) -> bool:
        return self._running is not None

    def start(self) -> None:
        config = uvicorn.Config(
            create_app(self.settings), host=LOOPBACK, port=self.port, log_level="warning", access_log=False
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + START_STOP_TIMEOUT_S
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, f"uvicorn did not start on {self.url}"
        self._running = (server, thread)

    def stop(self) -> None:
        assert self._running is not None
        server, thread = self._running
        server.should_exit = True
        thread.join(START_STOP_TIMEOUT_S)
        assert not thread.is_alive(), f"uvicorn did not stop on {self.url}"
        self._running = None


@pytest.fixture
def server(settings: Settings, port: int) -> Iterator[LiveServer]:
    live = LiveServer(settings, port)
    live.start()
    yield live
    if live.running:
        live.stop()


def reported_samples(server: LiveServer, run: str, user_id: int) -> int:
    rows = httpx.get(f"{server.url}/api/runs/{run}/leaderboard", timeout=10).json()["data"]
    return next((row["reported_samples"] for row in rows if row["user_id"] == user_id), 0)


def new_identity() -> PeerIdentity:
    key = Ed25519PrivateKey.generate()
    return PeerIdentity(private_key=key, public_key_raw=raw_public(key))


def test_reports_sent_during_an_outage_arrive_after_it_and_count_once(
    server: LiveServer, volunteer: Account, run_slug: str, tmp_path: Path
) -> None:
    identity = new_identity()
    with HivewireAPI(server.url, volunteer.token) as api:
        certificate = api.join(run_slug, identity.peer_key).certificate
    config = ReporterConfig(queue_path=tmp_path / "reports.jsonl", flush_interval_s=0.05)

    def reporter() -> Reporter:
        return Reporter(server.url, run_slug, identity, lambda: certificate, config, device_kind="cpu")

    first = reporter()
    first.report(epoch=0, samples=10, loss=3.0, samples_per_second=5.0, link_types=LINKS)
    result = first.flush()
    assert (len(result.accepted), result.pending, result.error) == (1, 0, None)

    server.stop()
    for samples in (20, 30, 40):
        first.report(epoch=1, samples=samples, loss=2.0, samples_per_second=5.0, link_types=LINKS)
    result = first.flush()
    assert result.accepted == [] and result.pending == 3 and isinstance(result.error, ServerUnreachable)
    first.close()  # the client stops too: its queue stays on disk
    assert len(ReportQueue(config.queue_path, max_bytes=config.max_queue_bytes)) == 3
    unanswered = config.queue_path.read_text()

    server.start()
    second = reporter()
    second.start()  # the background sender finds the server back
    deadline = time.monotonic() + START_STOP_TIMEOUT_S
    while second.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    second.close()
    assert second.pending == 0
    assert reported_samples(server, run_slug, volunteer.id) == 100

    # The answer to that batch got lost (say): the same reports are sent again, and count once.
    config.queue_path.write_text(unanswered)
    third = reporter()
    result = third.flush()
    third.close()
    assert (result.accepted, len(result.duplicate), result.pending) == ([], 3, 0)
    assert reported_samples(server, run_slug, volunteer.id) == 100


def test_reports_the_server_refuses_leave_the_queue(
    server: LiveServer, volunteer: Account, run_slug: str, tmp_path: Path
) -> None:
    identity = new_identity()
    with HivewireAPI(server.url, volunteer.token) as api:
        certificate = api.join(run_slug, identity.peer_key).certificate
    config = ReporterConfig(queue_path=tmp_path / "reports.jsonl")
    reporter = Reporter(server.url, run_slug, identity, lambda: certificate, config)
    reporter.report(epoch=0, samples=10**12, loss=1.0, samples_per_second=1.0, link_types=LINKS)
    good = reporter.report(epoch=0, samples=5, loss=1.0, samples_per_second=1.0, link_types=LINKS)
    result = reporter.flush()
    reporter.close()
    assert result.accepted == [good] and len(result.refused) == 1 and result.pending == 0


def test_reports_carry_each_links_measured_rate_within_the_servers_bounds(
    server: LiveServer, volunteer: Account, run_slug: str, tmp_path: Path
) -> None:
    """Rates that are no finite number >= 0 (a link's measurement gone wrong) read as unknown, the list is cut
    at the server's bound, and the server takes the signed report."""
    identity = new_identity()
    with HivewireAPI(server.url, volunteer.token) as api:
        certificate = api.join(run_slug, identity.peer_key).certificate
    links = [LinkRate("direct_tls", 4.1e8), LinkRate("relay", math.nan), LinkRate("host", -3.0)]
    links += [LinkRate("srflx", 1e6)] * MAX_REPORTED_LINKS
    reporter = Reporter(server.url, run_slug, identity, lambda: certificate, ReporterConfig(tmp_path / "q.jsonl"))
    sent = reporter.report(epoch=0, samples=5, loss=1.0, samples_per_second=1.0, link_types=LINKS, links=links)
    queued = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    result = reporter.flush()
    reporter.close()
    assert result.accepted == [sent], result
    assert len(queued[0]["links"]) == MAX_REPORTED_LINKS
    assert queued[0]["links"][:3] == [
        {"type": "direct_tls", "bytes_per_s": 4.1e8},
        {"type": "relay", "bytes_per_s": 0.0},
        {"type": "host", "bytes_per_s": 0.0},
    ]


def test_a_receipt_each_member_signed_with_sign_receipt_is_stored(
    server: LiveServer, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    members = []
    for account in (organizer, volunteer):
        identity = new_identity()
        with HivewireAPI(server.url, account.token) as api:
            members.append((identity, api.join(run_slug, identity.peer_key).certificate))
    samples = {identity.peer_id: 100 * (n + 1) for n, (identity, _) in enumerate(members)}
    round_id = "round-from-client"
    body = {
        "round_id": round_id,
        "epoch": 4,
        "members": [
            {"peer_id": identity.peer_id, "certificate": certificate, "samples": samples[identity.peer_id]}
            for identity, certificate in members
        ],
        "signatures": {
            identity.peer_id: sign_receipt(identity, run=run_slug, round_id=round_id, epoch=4, members=samples)
            for identity, _ in members
        },
    }
    headers = {"Authorization": f"Bearer {members[0][1]}"}
    response = httpx.post(f"{server.url}/api/runs/{run_slug}/receipts", json=body, headers=headers, timeout=10)
    assert response.status_code == 201, response.text
    rows = httpx.get(f"{server.url}/api/runs/{run_slug}/leaderboard", timeout=10).json()["data"]
    assert [(row["user_id"], row["verified_samples"]) for row in rows] == [(volunteer.id, 200), (organizer.id, 100)]


def test_the_queue_is_bounded_and_skips_a_torn_line(tmp_path: Path) -> None:
    identity = new_identity()
    with pytest.raises(ValueError, match="loss must be a finite number"):
        sign_report(identity, epoch=0, samples=1, loss=math.nan, samples_per_second=1.0, link_types=LINKS,
                    device_kind="cpu", now=1.0)  # fmt: skip
    path = tmp_path / "reports.jsonl"
    reports = [
        sign_report(
            identity, epoch=0, samples=n, loss=1.0, samples_per_second=1.0, link_types=LINKS, device_kind="cpu", now=n
        )
        for n in range(10)
    ]
    size = len(json.dumps(reports[0], separators=(",", ":"))) + 1
    queue = ReportQueue(path, max_bytes=5 * size + size // 2)
    for report in reports:
        queue.append(report)
    assert [report["samples"] for report in queue.oldest(100)] == [5, 6, 7, 8, 9]  # the oldest went

    torn = tmp_path / "torn.jsonl"
    shutil.copy(path, torn)
    with torn.open("a") as file:
        file.write('{"report_id": "half a repo')
    reloaded = ReportQueue(torn, max_bytes=10**6)
    assert [report["samples"] for report in reloaded.oldest(100)] == [5, 6, 7, 8, 9]
    reloaded.remove({reports[5]["report_id"], reports[9]["report_id"]})
    assert [report["samples"] for report in ReportQueue(torn, max_bytes=10**6).oldest(100)] == [6, 7, 8]


def test_a_queued_receipt_is_uploaded_by_every_member_and_counted_once(
    server: LiveServer, organizer: Account, volunteer: Account, run_slug: str, tmp_path: Path
) -> None:
    """Each member queues the co-signed receipt; the first upload stores it, the other is a duplicate, and a
    receipt the server refuses for good (a forged signature) leaves the queue instead of blocking it."""
    members = []
    for account in (organizer, volunteer):
        identity = new_identity()
        with HivewireAPI(server.url, account.token) as api:
            members.append((identity, api.join(run_slug, identity.peer_key).certificate))
    samples = {identity.peer_id: 300 + n for n, (identity, _) in enumerate(members)}

    def receipt(round_id: str) -> dict[str, object]:
        return {
            "round_id": round_id,
            "epoch": 2,
            "members": [
                {"peer_id": identity.peer_id, "certificate": certificate, "samples": samples[identity.peer_id]}
                for identity, certificate in members
            ],
            "signatures": {
                identity.peer_id: sign_receipt(identity, run=run_slug, round_id=round_id, epoch=2, members=samples)
                for identity, _ in members
            },
        }

    forged = receipt("forged-round")
    forged["signatures"] = {peer: receipt("another-round")["signatures"][peer] for peer in samples}  # type: ignore[index]
    results = []
    for n, (identity, certificate) in enumerate(members):
        config = ReporterConfig(queue_path=tmp_path / f"member{n}" / "reports.jsonl")
        reporter = Reporter(server.url, run_slug, identity, functools.partial(str, certificate), config)
        if n == 0:
            reporter.receipt(forged)
        reporter.receipt(receipt("round-cosigned"))
        assert reporter.pending_receipts == 1 + (n == 0)
        results.append(reporter.close(timeout_s=10))
        assert reporter.pending_receipts == 0 and reporter.receipts_delivered == 1
    assert results[0].receipts_refused == ["forged-round"]
    assert results[0].receipts_stored == results[1].receipts_stored == ["round-cosigned"]
    rows = httpx.get(f"{server.url}/api/runs/{run_slug}/leaderboard", timeout=10).json()["data"]
    assert sorted((row["verified_samples"], row["rounds"]) for row in rows) == [(300, 1), (301, 1)]


def test_receipts_wait_on_disk_while_the_server_is_down(server: LiveServer, tmp_path: Path) -> None:
    identity = new_identity()
    config = ReporterConfig(queue_path=tmp_path / "reports.jsonl", request_timeout_s=2.0)
    server.stop()
    reporter = Reporter(server.url, "some-run", identity, lambda: "certificate", config)
    reporter.receipt({"round_id": "round-waiting", "epoch": 0, "members": [], "signatures": {}})
    result = reporter.close(timeout_s=5)
    assert isinstance(result.error, ServerUnreachable) and result.receipts_pending == 1
    queued = ReportQueue(tmp_path / "reports-receipts.jsonl", max_bytes=10**6, key="round_id").oldest(10)
    assert [entry["round_id"] for entry in queued] == ["round-waiting"]
