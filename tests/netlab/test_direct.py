"""The direct TLS path in the NAT lab: peers behind two different NATs cannot reach each other over TCP and
stay on WebRTC (each side tried, neither guessed); two peers on the public bridge reach each other and move
the payload over direct TLS.

Each peer is a separate process in its namespace running this module (``python -m tests.netlab.test_direct``),
signaling through files as tests/netlab/peer.py does, with a DirectEndpoint listening on the namespace's own
addresses (those ICE gathers), exactly as a volunteer's mesh would.
"""

import argparse
import asyncio
import hashlib
import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCPeerConnection

from hivewire.mesh import (
    ControlCodec,
    DirectEndpoint,
    DirectSettings,
    Link,
    LinkSettings,
    RecordSchema,
    build_configuration,
)
from tests.netlab.lab import Lab, NatKind
from tests.netlab.peer import Signal

logger = logging.getLogger("netlab.direct")

REPO = Path(__file__).resolve().parents[2]
PAYLOAD_BYTES = 4 * 2**20
PEER_TIMEOUT_S = 60.0  # everything one peer does; ICE in the lab takes about a second, the dials a few
SETTLE_TIMEOUT_S = 30.0  # until the direct path is up or both sides found it unreachable
RECEIVED = RecordSchema("netlab_received", {"payload_id": int, "sha256": str})
# Short dial timeouts: the lab is a LAN, and an unreachable address costs each side connect_timeout_s.
LAB_DIRECT = DirectSettings(connect_timeout_s=1.5, handshake_timeout_s=3.0)


@dataclass
class Outcome:
    """What one peer reports as JSON."""

    role: str
    ok: bool = False
    path: str | None = None
    direct_state: str | None = None
    listening: list[list[Any]] | None = None
    sha256: str | None = None
    error: str | None = None


@pytest.fixture(scope="module")
def direct_lab(netlab_ready: None) -> Iterator[Lab]:
    """coturn on the bridge and two homes behind two different cone NATs."""
    with Lab() as built:
        built.start_turn(secrets.token_hex(16))
        built.add_home("dir-a", NatKind.CONE)
        built.add_home("dir-b", NatKind.CONE)
        yield built


def run_pair(lab: Lab, directory: Path, namespaces: tuple[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run an offerer and an answerer in the given namespaces until both exit; their outcomes."""
    assert lab.turn is not None
    processes = {}
    for role, ns in zip(("offerer", "answerer"), namespaces, strict=True):
        argv = [
            sys.executable,
            "-m",
            "tests.netlab.test_direct",
            f"--role={role}",
            f"--signal-dir={directory}",
            f"--ice-servers={json.dumps(lab.turn.ice_servers(user_id=7))}",
            f"--result={directory / f'{role}.json'}",
        ]
        processes[role] = lab.popen(ns, argv, directory / f"{role}.log", cwd=REPO)
    for role, process in processes.items():
        try:
            process.wait(timeout=PEER_TIMEOUT_S + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{role} still running after {PEER_TIMEOUT_S + 15} s; log: {directory / role}.log")
    logs = "\n".join(f"--- {role} ---\n{(directory / f'{role}.log').read_text()[-3000:]}" for role in processes)
    outcomes = []
    for role in processes:
        path = directory / f"{role}.json"
        assert path.exists(), f"{role} wrote no result\n{logs}"
        outcome = json.loads(path.read_text())
        assert outcome["ok"], f"{role}: {outcome['error']}\n{logs}"
        assert "Traceback" not in (directory / f"{role}.log").read_text(), logs
        outcomes.append(outcome)
    assert outcomes[0]["sha256"] == outcomes[1]["sha256"], logs
    return outcomes[0], outcomes[1]


@pytest.mark.netlab
@pytest.mark.slow
def test_peers_behind_different_nats_stay_on_webrtc(direct_lab: Lab, tmp_path: Path) -> None:
    homes = direct_lab.homes
    offerer, answerer = run_pair(direct_lab, tmp_path, (homes["dir-a"].ns, homes["dir-b"].ns))
    for outcome in (offerer, answerer):
        assert outcome["path"] == "webrtc", outcome
        assert outcome["direct_state"] == "unreachable", outcome  # both dialled: neither side guessed
    assert offerer["listening"] == [[homes["dir-a"].lan_ip, offerer["listening"][0][1]]]


@pytest.mark.netlab
def test_peers_on_the_public_bridge_use_direct_tls(direct_lab: Lab, tmp_path: Path) -> None:
    offerer, answerer = run_pair(direct_lab, tmp_path, (direct_lab.pub, direct_lab.pub))
    for outcome in (offerer, answerer):
        assert outcome["path"] == "direct-tls", outcome
        assert outcome["direct_state"] == "up", outcome


# ------------------------------------------------------------------------------------ the peer process


async def settle(link: Link) -> None:
    """Wait until the direct path is up, or this side knows it cannot be (its own dial failed)."""
    async with asyncio.timeout(SETTLE_TIMEOUT_S):
        while link.direct_state not in ("up", "unreachable", "refused"):  # noqa: ASYNC110 - no event for it
            await asyncio.sleep(0.05)


async def negotiate(pc: RTCPeerConnection, signal: Signal) -> None:
    """One offer/answer through the signal directory (no trickle: gathering finishes first)."""
    if signal.role == "offerer":
        await pc.setLocalDescription(await pc.createOffer())
        signal.send("offer", 1, pc.localDescription)
        await pc.setRemoteDescription(await signal.receive("answer", 1))
    else:
        await pc.setRemoteDescription(await signal.receive("offer", 1))
        await pc.setLocalDescription(await pc.createAnswer())
        signal.send("answer", 1, pc.localDescription)


async def peer(args: argparse.Namespace) -> Outcome:
    signal = Signal(args.signal_dir, args.role)
    outcome = Outcome(role=args.role)
    endpoint = DirectEndpoint(LAB_DIRECT)
    await endpoint.start()
    outcome.listening = [[host, port] for host, port in endpoint.addresses]
    pc = RTCPeerConnection(build_configuration(args.ice_servers))
    link = Link(pc, peer=signal.other, codec=ControlCodec([RECEIVED]), settings=LinkSettings(), direct=endpoint)
    try:
        async with asyncio.timeout(PEER_TIMEOUT_S):
            await negotiate(pc, signal)
            await link.wait_open()
            await settle(link)
            if args.role == "offerer":
                # The answerer may still be dialling back when we know; give it the same chance to settle.
                await asyncio.sleep(LAB_DIRECT.connect_timeout_s * 4)
                data = os.urandom(PAYLOAD_BYTES)
                outcome.sha256 = hashlib.sha256(data).hexdigest()
                outcome.path, outcome.direct_state = link.path, link.direct_state
                await link.send_payload(data)
                record = await link.recv_control()
                if record["sha256"] != outcome.sha256:
                    raise RuntimeError(f"the answerer acknowledged {record}")
            else:
                _, data = await link.recv_payload()
                outcome.path, outcome.direct_state = link.path, link.direct_state
                outcome.sha256 = hashlib.sha256(data).hexdigest()
                link.send_control({"type": RECEIVED.type, "payload_id": 1, "sha256": outcome.sha256})
                await asyncio.wait_for(link.wait_closed(), 10)
        outcome.ok = True
    except Exception as exc:  # reported to the test in the outcome, with the log beside it
        outcome.error = f"{type(exc).__name__}: {exc}"
        logger.error("%s failed: %s", args.role, outcome.error)
    finally:
        await link.close()
        await endpoint.close()
    return outcome


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=["offerer", "answerer"], required=True)
    parser.add_argument("--signal-dir", type=Path, required=True)
    parser.add_argument("--ice-servers", type=json.loads, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.role} %(name)s %(levelname)s %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    outcome = asyncio.run(peer(args))
    temporary = args.result.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(outcome)))
    temporary.replace(args.result)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
