"""Peers behind real NATs: cone pairs punch through, symmetric pairs need the TURN relay, blocked UDP says so.

Each peer is a separate process inside its home namespace (tests/netlab/peer.py), with the ICE servers and
TURN credentials the Hivewire server would hand out, against a real coturn using the same secret.
"""

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hivewire.diagnostics import UDP_BLOCKED, MappingBehaviour
from tests.netlab.lab import PUB_IP, TURN_ALT_PORT, TURN_PORT, Home, Lab, run

pytestmark = pytest.mark.netlab
logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
PAYLOAD_BYTES = 2 * 2**20
ICE_TIMEOUT_S = 30.0  # per attempt; a lab LAN connects in about a second even on a loaded 2-core box
PEER_TIMEOUT_S = 75.0  # everything a peer does, both attempts included
LOG_TAIL_CHARS = 4000


@dataclass
class PairRun:
    """Both peers' result JSON, plus what to show when an assertion fails."""

    offerer: dict[str, Any]
    answerer: dict[str, Any]
    evidence: str


def run_peers(lab: Lab, directory: Path, offerer: Home, answerer: Home, *options: str) -> PairRun:
    """Run an offerer in one home and an answerer in another until both exit; return their results.

    ``directory`` holds the signaling files, logs and results (pytest's tmp_path: kept after a failure).
    """
    assert lab.turn is not None
    ice_servers = json.dumps(lab.turn.ice_servers(user_id=42))
    processes = {}
    for role, home in (("offerer", offerer), ("answerer", answerer)):
        argv = [
            sys.executable,
            "-m",
            "tests.netlab.peer",
            f"--role={role}",
            f"--signal-dir={directory}",
            f"--ice-servers={ice_servers}",
            f"--result={directory / f'{role}.json'}",
            f"--payload-bytes={PAYLOAD_BYTES}",
            f"--ice-timeout-s={ICE_TIMEOUT_S}",
            f"--timeout-s={PEER_TIMEOUT_S}",
            *options,
        ]
        processes[role] = lab.popen(home.ns, argv, directory / f"{role}.log", cwd=REPO)
    for role, process in processes.items():
        try:
            process.wait(timeout=PEER_TIMEOUT_S + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{role} still running {PEER_TIMEOUT_S + 15} s after start; log: {directory / role}.log")
    logs = {role: (directory / f"{role}.log").read_text() for role in processes}
    evidence = "\n".join(
        [
            *(f"--- {role} log (tail) ---\n{text[-LOG_TAIL_CHARS:]}" for role, text in logs.items()),
            *(f"--- conntrack {home.router_ns} ---\n{lab.conntrack(home)}" for home in (offerer, answerer)),
        ]
    )
    results = {}
    for role in processes:
        path = directory / f"{role}.json"
        assert path.exists(), f"{role} wrote no result\n{evidence}"
        results[role] = json.loads(path.read_text())
        logger.info("%s: %s", role, results[role])
        # Failed ICE must be closed cleanly (notes pitfall 8): no stray CancelledError or task tracebacks.
        assert "Traceback" not in logs[role], f"{role} printed a traceback\n{evidence}"
    return PairRun(results["offerer"], results["answerer"], evidence)


def assert_payload_intact(pair: PairRun) -> None:
    """The answerer received exactly the bytes the offerer sent (the offerer checked the acknowledgement)."""
    assert pair.offerer["ok"] and pair.answerer["ok"], pair.evidence
    assert pair.answerer["payload_bytes"] == pair.offerer["payload_bytes"] == PAYLOAD_BYTES, pair.evidence
    assert pair.answerer["sha256"] == pair.offerer["sha256"], pair.evidence


def test_cone_nats_connect_directly_with_server_reflexive_candidates(lab: Lab, tmp_path: Path) -> None:
    pair = run_peers(lab, tmp_path, lab.homes["cone-1"], lab.homes["cone-2"])
    assert_payload_intact(pair)
    for result in (pair.offerer, pair.answerer):
        types = {result["selected"]["local"], result["selected"]["remote"]}
        assert "srflx" in types, pair.evidence
        assert "relay" not in types, pair.evidence
        assert [attempt["policy"] for attempt in result["attempts"]] == ["all"], pair.evidence


def test_symmetric_nats_connect_through_the_turn_relay(lab: Lab, tmp_path: Path) -> None:
    """Policy all may fail here (notes pitfall 7); the peers then fall back to relay-only on their own."""
    pair = run_peers(lab, tmp_path, lab.homes["sym-1"], lab.homes["sym-2"])
    assert_payload_intact(pair)
    for result in (pair.offerer, pair.answerer):
        selected = result["selected"]
        relayed = [selected[f"{end}_address"] for end in ("local", "remote") if selected[end] == "relay"]
        assert relayed, pair.evidence
        assert all(address.startswith(f"{PUB_IP}:") for address in relayed), pair.evidence  # coturn's relay


def test_blocked_udp_fails_in_bounded_time_with_a_clear_error(lab: Lab, tmp_path: Path) -> None:
    pair = run_peers(lab, tmp_path, lab.homes["blocked"], lab.homes["cone-3"])
    assert not pair.offerer["ok"] and not pair.answerer["ok"], pair.evidence
    assert pair.offerer["error"] == UDP_BLOCKED, pair.evidence
    assert pair.offerer["attempts"][0]["gathered"] == ["host"], pair.evidence
    assert pair.answerer["error"] == f"counterpart gave up: {UDP_BLOCKED}", pair.evidence


@pytest.mark.parametrize(
    ("label", "expected"),
    [("cone-1", MappingBehaviour.ENDPOINT_INDEPENDENT), ("sym-1", MappingBehaviour.ENDPOINT_DEPENDENT)],
)
def test_lab_nats_map_as_they_claim(lab: Lab, label: str, expected: MappingBehaviour) -> None:
    """Two binding requests from one socket to two coturn ports: one mapped port means endpoint-independent."""
    home = lab.homes[label]
    output = run(
        [
            sys.executable,
            "-m",
            "tests.netlab.diagnose",
            f"{PUB_IP}:{TURN_PORT}",
            f"{PUB_IP}:{TURN_ALT_PORT}",
        ],
        ns=home.ns,
        cwd=REPO,
    )
    found = json.loads(output)
    assert found["behaviour"] == expected, found
    assert {host for host, _ in found["mapped"]} == {home.wan_ip}, found
