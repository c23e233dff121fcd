"""`hivewire doctor` against the real server (uvicorn on a free loopback port) and a real coturn on loopback.

No packet leaves loopback: coturn listens and relays on 127.0.0.1 (and 127.0.0.2, which coturn needs to
open its alternate port), the server hands out only those addresses, and host candidates are restricted
to 127.0.0.1 for the whole module. Proves: host, server-reflexive and relay candidates, the NAT mapping
check with two STUN ports and its honest "unknown" with one, a TURN allocation refused for a wrong secret
with advice, the data path step, a live peer's path, round trip and throughput (or why not measured), and
the exit status; plus the advice when not signed in or when the server is unreachable. The path and
throughput helpers and the probe records are unit-tested at the end.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import aioice.ice
import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner, Result

from hivewire.api import HivewireAPI
from hivewire.cli import CliState, app
from hivewire.doctor import (
    PROBE_MAX_BYTES,
    PROBE_SCHEMAS,
    ProbeResponder,
    Status,
    link_path,
    throughput_summary,
    transport_check,
)
from hivewire.identity import CertificateVerifier, PeerIdentity
from hivewire.mesh import ControlCodec, ControlRecordError, Link, restrict_host_addresses
from hivewire.mesh.manager import Mesh
from hivewire.signaling import DescriptionVerifier, SignalingClient
from hivewire_server.main import create_app
from tests.conftest import RUN, TURN_SECRET, make_settings, new_user

LOOPBACK = "127.0.0.1"
COTURN_ALT_IP = "127.0.0.2"  # coturn opens its alternate port only with a second listening address
START_TIMEOUT_S = 10.0  # coturn bound / uvicorn started / the live peer's mesh started, normally under a second
STOP_TIMEOUT_S = 5.0
DOCTOR_BUDGET_S = 30.0  # what the doctor promises even when every probe times out

# The doctor restricts host candidates itself with this flag; the module fixture covers the rest.
LOOPBACK_ONLY = ("--host-address", LOOPBACK)
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # no backend question here


def _free_port_pair() -> int:
    """A port P with P and P + 1 free for UDP and TCP on loopback (coturn's listening and alternate ports)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((LOOPBACK, 0))
            port = int(probe.getsockname()[1])
        if port < 65000 and all(_free(port + offset, kind) for offset in (0, 1) for kind in socket.SocketKind):
            return port
    raise RuntimeError("no two consecutive free ports on loopback")


def _free(port: int, kind: socket.SocketKind) -> bool:
    if kind not in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        return True
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _udp_bound(port: int) -> bool:
    listening = subprocess.run(["ss", "-H", "-u", "-l", "-n"], capture_output=True, text=True, check=True).stdout
    return f"{LOOPBACK}:{port} " in listening


@pytest.fixture(scope="module", autouse=True)
def _loopback_only() -> Iterator[None]:
    """Host candidates on 127.0.0.1 alone (aioice would gather every other address of this machine)."""
    restrict_host_addresses([LOOPBACK])
    assert aioice.ice.get_host_addresses(True, True) == [LOOPBACK]
    yield
    restrict_host_addresses(None)


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """coturn with the shared-secret scheme the server's TURN credentials use; yields its listening port."""
    workdir = tmp_path_factory.mktemp("coturn")
    port = _free_port_pair()
    argv = [
        "turnserver",
        "-n",
        f"--listening-ip={LOOPBACK}",
        f"--listening-ip={COTURN_ALT_IP}",
        f"--relay-ip={LOOPBACK}",
        f"--listening-port={port}",
        f"--alt-listening-port={port + 1}",
        "--min-port=61000",
        "--max-port=61999",
        "--use-auth-secret",
        f"--static-auth-secret={TURN_SECRET}",
        "--realm=hivewire.test",
        "--fingerprint",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        f"--pidfile={workdir / 'turnserver.pid'}",
        f"--log-file={workdir / 'turnserver.log'}",
        "--simple-log",
    ]
    with (workdir / "turnserver.out").open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (_udp_bound(port) and _udp_bound(port + 1)):
            assert process.poll() is None, (workdir / "turnserver.out").read_text()
            assert time.monotonic() < deadline, f"coturn did not bind UDP {port} and {port + 1}"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


ServerFactory = Callable[..., str]


@pytest.fixture
def start_server(database_url: str) -> Iterator[ServerFactory]:
    """Start the real app under uvicorn in a thread with settings overrides; returns its URL."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: object) -> str:
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            port = int(probe.getsockname()[1])
        url = f"http://{LOOPBACK}:{port}"
        settings = make_settings(database_url, public_url=url, **overrides)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host=LOOPBACK, port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name=f"uvicorn-{port}")
        thread.start()
        running.append((server, thread))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, f"uvicorn did not start on {url}"
            time.sleep(0.02)
        return url

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S)


def volunteer_in_a_run(url: str, home: Path) -> str:
    """An organizer creates the run, a volunteer signs in with `hivewire login --token`; returns the run URL."""
    with httpx.Client(base_url=url, timeout=10.0) as http:
        organizer = new_user(http, "olivia")  # type: ignore[arg-type]  # has the calls new_user makes
        response = http.post("/api/runs", json=RUN, headers=organizer.headers)
        assert response.status_code == 201, response.text
        volunteer = new_user(http, "victor")  # type: ignore[arg-type]
    result = hivewire(home, "login", url, "--token", volunteer.token)
    assert result.exit_code == 0, result.output
    return f"{url}/runs/{RUN['slug']}"


@pytest.fixture
def peer_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in its own thread for a live peer, so it answers while the doctor runs in this one."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="live-peer")
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(STOP_TIMEOUT_S)
    loop.close()


def on_loop(loop: asyncio.AbstractEventLoop, work: Coroutine[object, object, Any]) -> Any:
    return asyncio.run_coroutine_threadsafe(work, loop).result(START_TIMEOUT_S)


class RecordingMesh(Mesh):
    """A mesh that keeps every link it adopted, so a test can read a link's counters after it closed."""

    adopted: list[Link]
    responder: ProbeResponder | None

    def _adopt(self, link: Link) -> None:
        self.adopted.append(link)
        super()._adopt(link)


async def start_live_peer(url: str, certificates: CertificateVerifier, *, probes: bool) -> RecordingMesh:
    """Another volunteer's client: joins with its own key and user, meshes through the server's signaling.

    With ``probes`` it takes the doctor's throughput probes (``mesh.responder``); without, it is what a
    volunteer's client is today: the probe record is unknown to it and refused.
    """
    with httpx.Client(base_url=url, timeout=10.0) as http:
        token = new_user(http, "lena").token  # type: ignore[arg-type]
    key = Ed25519PrivateKey.generate()
    identity = PeerIdentity(private_key=key, public_key_raw=key.public_key().public_bytes_raw())
    with HivewireAPI(url, token) as api:
        joined = api.join(str(RUN["slug"]), identity.peer_key)
    mesh = RecordingMesh(
        identity,
        lambda: joined.certificate,
        DescriptionVerifier(certificates, run=str(RUN["slug"]), self_peer_id=identity.peer_id),
        ice_servers=[ice.model_dump(exclude_none=True) for ice in joined.ice_servers],
        signaling=SignalingClient(joined.signaling_url, lambda: joined.certificate),
        schemas=PROBE_SCHEMAS if probes else (),
    )
    mesh.adopted = []
    mesh.responder = ProbeResponder(mesh) if probes else None
    await mesh.start(joined.initial_peers)
    return mesh


async def stop_live_peer(mesh: RecordingMesh) -> None:
    if mesh.responder is not None:
        await mesh.responder.close()
    await mesh.close()


def hivewire(home: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, ["--home", str(home), *args], obj=CliState(), env=env)


def doctor_json(home: Path, run_url: str) -> tuple[int, dict[str, Any]]:
    started = time.monotonic()
    result = hivewire(home, "doctor", run_url, "--json", *LOOPBACK_ONLY)
    assert time.monotonic() - started < DOCTOR_BUDGET_S
    return result.exit_code, json.loads(result.stdout)


def steps(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["step"]: check for check in report["checks"]}


@SQLITE_ONLY
def test_doctor_finds_direct_and_relayed_paths(start_server: ServerFactory, coturn: int, tmp_path: Path) -> None:
    url = start_server(
        stun_urls=[f"stun:{LOOPBACK}:{coturn}", f"stun:{LOOPBACK}:{coturn + 1}"],
        turn_urls=[f"turn:{LOOPBACK}:{coturn}?transport=udp"],
    )
    run_url = volunteer_in_a_run(url, tmp_path)

    result = hivewire(tmp_path, "doctor", run_url, *LOOPBACK_ONLY)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].startswith(f"✓ 1. Server and join: {url} reachable; joined run Tiny LM demo as p"), result.output
    assert "ICE servers: 2 STUN, 1 TURN" in lines[1]
    assert lines[2] == "✓ 2. ICE candidates: gathered host, srflx, relay candidates"
    assert lines[3].startswith("✓ 3. STUN and NAT mapping: public address 127.0.0.1:"), result.output
    assert "endpoint-independent mapping" in lines[3]
    assert lines[4].startswith(f"✓ 4. TURN relay: turn:{LOOPBACK}:{coturn}?transport=udp allocated relay 127.0.0.1:")
    assert lines[5] == "✓ 5. Data path: tuned SCTP active (aiortc 1.16.0), uvloop; direct TLS path enabled"
    assert lines[6] == "- 6. Live peer: no live peer to test"
    assert lines[7] == "✓ This computer can take part: directly, and through the TURN relay where needed."
    assert "→" not in result.stdout  # no advice when nothing is wrong

    code, report = doctor_json(tmp_path, run_url)
    assert code == 0
    assert report["verdict"] == {
        "can_take_part": True,
        "code": "direct-and-relay",
        "summary": "can take part: directly, and through the TURN relay where needed",
    }
    found = steps(report)
    assert [check["status"] for check in found.values()] == ["ok", "ok", "ok", "ok", "ok", "skip"]
    assert found["transport"]["details"] == {
        "sctp_tuning": True,
        "aiortc": "1.16.0",
        "tuned_for_aiortc": "1.16.0",
        "sctp_tuning_setting": None,
        "event_loop": "uvloop",
        "direct_path": True,
    }
    assert found["candidates"]["details"] == {"types": ["host", "srflx", "relay"]}
    assert found["nat"]["details"]["behaviour"] == "endpoint-independent"


@SQLITE_ONLY
def test_wrong_turn_secret_fails_turn_with_advice(start_server: ServerFactory, coturn: int, tmp_path: Path) -> None:
    """One STUN address (the TURN port is the same one): the mapping behaviour is honestly unknown."""
    url = start_server(
        stun_urls=[f"stun:{LOOPBACK}:{coturn}"],
        turn_urls=[f"turn:{LOOPBACK}:{coturn}?transport=udp"],
        turn_secret="not-the-secret-coturn-was-given",
    )
    run_url = volunteer_in_a_run(url, tmp_path)

    result = hivewire(tmp_path, "doctor", run_url, *LOOPBACK_ONLY)
    assert result.exit_code == 0, result.output  # direct links still work
    assert "✗ 4. TURN relay: turn:127.0.0.1:" in result.stdout
    assert "refused the allocation: 401 Unauthorized" in result.stdout
    assert "→ The TURN server refused the run's credentials: tell the organizer" in result.stdout
    assert "mapping behaviour unknown (only one STUN address configured, two answers" in result.stdout

    code, report = doctor_json(tmp_path, run_url)
    assert code == 0
    found = steps(report)
    assert found["turn"]["status"] == "fail"
    assert found["turn"]["details"]["error_code"] == 401
    assert found["candidates"]["details"] == {"types": ["host", "srflx"]}
    assert found["nat"]["details"]["behaviour"] == "unknown"
    assert report["verdict"]["code"] == "direct"


def test_not_signed_in_gets_the_login_advice(tmp_path: Path) -> None:
    """Refused before any request: nothing listens at this address, and nothing is sent to it."""
    result = hivewire(tmp_path, "doctor", f"http://{LOOPBACK}:9/runs/{RUN['slug']}")
    assert result.exit_code == 1
    assert "not signed in to http://127.0.0.1:9" in result.stderr
    assert "Run `hivewire login <server url>` first." in result.stderr


def test_empty_host_address_is_a_config_error(tmp_path: Path) -> None:
    token = {"HIVEWIRE_TOKEN": "hw_" + "t" * 43}
    result = hivewire(tmp_path, "doctor", f"http://{LOOPBACK}:9/runs/{RUN['slug']}", "--host-address", "", env=token)
    assert result.exit_code == 1
    assert "Error: --host-address: host addresses: expected IP addresses or interface names, got ''" in result.stderr
    assert "Fix the value named above" in result.stderr


def test_unreachable_server_fails_step_one(tmp_path: Path) -> None:
    """A closed loopback port: step 1 fails with the network advice, and no network check runs."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = int(probe.getsockname()[1])  # closed again when the block ends: connections are refused
    token = {"HIVEWIRE_TOKEN": "hw_" + "t" * 43}
    result = hivewire(tmp_path, "doctor", f"http://{LOOPBACK}:{port}/runs/{RUN['slug']}", "--json", env=token)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert [check["step"] for check in report["checks"]] == ["server"]
    assert report["checks"][0]["advice"] == "Check the server URL and your network connection, then try again."
    assert report["verdict"]["code"] == "server"


@pytest.mark.slow
@SQLITE_ONLY
def test_silent_second_stun_address_leaves_the_mapping_unknown(
    start_server: ServerFactory, coturn: int, tmp_path: Path
) -> None:
    """The first STUN server answers, the second (a closed loopback port) does not: unknown, not a failure.

    Slow (about 9 s): the doctor waits out the silent address's retransmissions, then rechecks the first.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        silent = int(probe.getsockname()[1])
    url = start_server(stun_urls=[f"stun:{LOOPBACK}:{coturn}", f"stun:{LOOPBACK}:{silent}"], turn_urls=[])
    run_url = volunteer_in_a_run(url, tmp_path)

    code, report = doctor_json(tmp_path, run_url)
    assert code == 0, report
    nat = steps(report)["nat"]
    assert nat["status"] == "ok", nat
    assert nat["details"]["behaviour"] == "unknown"
    assert f"(the second STUN address {LOOPBACK}:{silent} did not answer, two answers" in nat["summary"]
    assert steps(report)["turn"]["status"] == "skip"
    assert report["verdict"]["code"] == "direct"


@SQLITE_ONLY
def test_doctor_links_to_a_live_peer(
    start_server: ServerFactory, coturn: int, tmp_path: Path, peer_loop: asyncio.AbstractEventLoop
) -> None:
    """A peer that takes probes: the doctor links through signaling, the bulk path comes up as direct TLS
    on loopback, round trips are timed and a few MB of probe payloads are delivered and timed."""
    url = start_server(stun_urls=[f"stun:{LOOPBACK}:{coturn}"], turn_urls=[f"turn:{LOOPBACK}:{coturn}?transport=udp"])
    run_url = volunteer_in_a_run(url, tmp_path)
    certificates = CertificateVerifier(url)
    live = on_loop(peer_loop, start_live_peer(url, certificates, probes=True))
    try:
        code, report = doctor_json(tmp_path, run_url)
        probes = live.responder.probes
    finally:
        on_loop(peer_loop, stop_live_peer(live))
        certificates.close()
    assert code == 0, report
    peer = steps(report)["peer"]
    assert peer["status"] == "ok", peer
    details = peer["details"]
    assert details["path"] == "direct-tls", peer
    assert details["path_label"] == "direct TLS"
    assert details["direct_state"] == "up"
    assert peer["summary"].startswith(
        f"linked to {live.peer_id}: bulk over direct TLS (WebRTC control: host to host), round trip "
    ), peer
    assert 0 < details["rtt_ms"] < 1000
    assert details["pair"]["remote_address"].startswith(f"{LOOPBACK}:")
    assert probes == 1
    assert details["probe_complete"] is True, peer
    assert 0 < details["probe_bytes"] <= PROBE_MAX_BYTES
    assert details["throughput_mb_s"] > 0
    assert details["probe_seconds"] > 0
    said = re.search(r"; throughput (\d+\.\d) MB/s \(", peer["summary"])
    assert said is not None, peer
    assert abs(float(said[1]) - details["throughput_mb_s"]) <= 0.051, peer  # the text rounds the unrounded rate
    assert report["verdict"]["code"] == "direct-and-relay"


@SQLITE_ONLY
def test_a_peer_without_a_probe_responder_gets_no_payloads(
    start_server: ServerFactory, coturn: int, tmp_path: Path, peer_loop: asyncio.AbstractEventLoop
) -> None:
    """A volunteer's client as it is: it refuses the probe record, so the doctor sends it no bulk payload."""
    url = start_server(stun_urls=[f"stun:{LOOPBACK}:{coturn}"], turn_urls=[])
    run_url = volunteer_in_a_run(url, tmp_path)
    certificates = CertificateVerifier(url)
    live = on_loop(peer_loop, start_live_peer(url, certificates, probes=False))
    try:
        code, report = doctor_json(tmp_path, run_url)
    finally:
        on_loop(peer_loop, stop_live_peer(live))
        certificates.close()
    assert code == 0, report
    peer = steps(report)["peer"]
    assert peer["status"] == "ok", peer
    assert peer["details"]["throughput_mb_s"] is None
    assert peer["details"]["probe_bytes"] == 0
    assert peer["summary"].endswith(
        "; throughput not measured: the peer took no probe (it was answering another one, or its "
        "client is older than this one)"
    ), peer
    assert [(link.stats.payloads_received, link.stats.records_refused) for link in live.adopted] == [(0, 1)]


def test_link_path_prefers_direct_then_relay_then_reflexive() -> None:
    assert link_path(True, "relay", "host") == "direct-tls"
    assert link_path(False, "host", "relay") == "turn-relay"
    assert link_path(False, "relay", "srflx") == "turn-relay"
    assert link_path(False, "srflx", "host") == "webrtc-srflx"
    assert link_path(False, "prflx", "srflx") == "webrtc-srflx"
    assert link_path(False, "host", "prflx") == "webrtc-prflx"
    assert link_path(False, "host", "host") == "webrtc-host"


def test_throughput_summary_is_an_upper_bound_when_incomplete() -> None:
    rate, text = throughput_summary(8_000_000, 0.5, complete=True)
    assert rate == pytest.approx(16.0)
    assert text == "throughput 16.0 MB/s (8.0 MB in 0.50 s)"
    rate, text = throughput_summary(3_000_000, 8.0, complete=False)
    assert rate == pytest.approx(0.375)
    assert text == "throughput under 0.4 MB/s (the peer had not taken all of 3.0 MB in 8.00 s)"


def test_transport_check_says_why_tuning_is_off() -> None:
    tuned = transport_check(tuned=True, aiortc_version="1.16.0", setting=None, event_loop="uvloop", direct_enabled=True)
    assert tuned.status is Status.OK
    off = transport_check(
        tuned=False, aiortc_version="1.16.0", setting="Off", event_loop="asyncio", direct_enabled=False
    )
    assert off.status is Status.WARN
    assert off.summary == (
        "tuned SCTP off (HIVEWIRE_SCTP_TUNING=Off): data channels run at aiortc's default speed, "
        "asyncio event loop (uvloop not installed); direct TLS path disabled"
    )
    assert off.advice is not None and off.advice.startswith("Unset HIVEWIRE_SCTP_TUNING")
    other = transport_check(tuned=False, aiortc_version="1.9.0", setting=None, event_loop="uvloop", direct_enabled=True)
    assert "aiortc 1.9.0 is installed, the tuning is written for 1.16.0" in other.summary
    assert other.advice == "Install aiortc 1.16.0 (pip install aiortc==1.16.0) to get the tuned path."
    assert other.details["sctp_tuning"] is False


def test_probe_records_are_bounded() -> None:
    codec = ControlCodec(PROBE_SCHEMAS)
    assert codec.decode(codec.encode({"type": "doctor_probe", "bytes": PROBE_MAX_BYTES}))["bytes"] == PROBE_MAX_BYTES
    with pytest.raises(ControlRecordError, match="outside"):
        codec.validate({"type": "doctor_probe", "bytes": PROBE_MAX_BYTES + 1})
    with pytest.raises(ControlRecordError, match="outside"):
        codec.validate({"type": "doctor_probe_ready", "bytes": -1})
    with pytest.raises(ControlRecordError, match="unknown record type 'doctor_probe'"):
        ControlCodec().validate({"type": "doctor_probe", "bytes": 1})


class FakeLink:
    """What ProbeResponder uses of a Link: send_control, recv_payload, peer."""

    def __init__(self, peer: str, payloads: list[bytes]) -> None:
        self.peer = peer
        self.sent: list[dict[str, Any]] = []
        self._payloads = asyncio.Queue[bytes]()
        for payload in payloads:
            self._payloads.put_nowait(payload)

    def send_control(self, record: dict[str, Any]) -> None:
        self.sent.append(record)

    async def recv_payload(self) -> tuple[int, bytes]:
        return 0, await self._payloads.get()

    def left(self) -> int:
        return self._payloads.qsize()


class FakeMesh:
    """What ProbeResponder uses of a Mesh: on_records and link()."""

    def __init__(self, links: dict[str, FakeLink]) -> None:
        self.links = links
        self.handlers: dict[str, Any] = {}

    def on_records(self, types: list[str], handler: Any) -> None:
        for kind in types:
            self.handlers[kind] = handler

    def link(self, peer: str) -> FakeLink | None:
        return self.links.get(peer)


async def test_probe_responder_drains_what_it_granted_and_takes_one_probe_at_a_time() -> None:
    probing = FakeLink("pprobing", [b"x" * 1000, b"y" * 1000, b"z" * 1000])
    second = FakeLink("psecond", [b"w" * 1000])
    refused = FakeLink("prefused", [b"v" * 1000])
    mesh = FakeMesh({link.peer: link for link in (probing, second, refused)})
    responder = ProbeResponder(mesh, accept=lambda peer: peer != "prefused")  # type: ignore[arg-type]
    probe = mesh.handlers["doctor_probe"]

    probe("prefused", {"type": "doctor_probe", "bytes": 1000})  # not accepted: no answer, nothing read
    probe("pnolink", {"type": "doctor_probe", "bytes": 1000})  # no link to it: ignored
    probe("pprobing", {"type": "doctor_probe", "bytes": 2000})
    probe("psecond", {"type": "doctor_probe", "bytes": 1000})  # while the first runs: ignored
    assert probing.sent == [{"type": "doctor_probe_ready", "bytes": 2000}]
    assert second.sent == [] and refused.sent == []
    await asyncio.wait_for(responder._task, 5)  # type: ignore[arg-type]
    assert probing.left() == 1  # read the 2000 bytes granted, not the payload after them
    assert refused.left() == 1 and second.left() == 1
    assert responder.probes == 1

    probe("psecond", {"type": "doctor_probe", "bytes": 1000})  # the first one is done: this one is taken
    await asyncio.wait_for(responder._task, 5)  # type: ignore[arg-type]
    assert second.sent == [{"type": "doctor_probe_ready", "bytes": 1000}] and second.left() == 0
    await responder.close()
