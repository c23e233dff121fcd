"""One side of a NAT lab connection: ICE through the lab's STUN/TURN, then a payload over the bulk channel.

Run inside a home namespace from the repository root::

    ip netns exec <home-ns> .venv/bin/python -m tests.netlab.peer --role offerer --signal-dir DIR \\
        --ice-servers JSON --result DIR/offerer.json

Signaling goes through files in DIR (``offer-N.json``, ``answer-N.json``; ``bye-<role>.json`` when a side
gives up), so no server is needed. Attempt 1 uses policy ``all``; when it fails and a relay candidate was
gathered, both sides retry relay-only (shared/notes pitfall 7: behind two symmetric NATs aioice's TURN
with policy ``all`` can fail where relay-only works). The result JSON names the selected pair's types,
every attempt's gathered candidates and error, and the payload's checksum and throughput.
"""

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aioice.stun
from aiortc import RTCPeerConnection, RTCSessionDescription

from hivewire.diagnostics import STUN_RETRANSMISSIONS, candidate_types, explain_ice_failure, selected_pair
from hivewire.mesh import ControlCodec, Link, LinkError, LinkSettings, RecordSchema, build_configuration
from hivewire.mesh.ice_timing import bound_connectivity_checks

logger = logging.getLogger("netlab.peer")

POLL_INTERVAL_S = 0.05  # how often the signal directory is looked at
CLOSE_TIMEOUT_S = 10.0  # the answerer waits this long for the offerer to close after the acknowledgement
RECEIVED = RecordSchema("netlab_received", {"payload_id": int, "sha256": str})


class PeerGaveUp(Exception):
    """The counterpart wrote its bye file: it will not take part in the next step."""


@dataclass
class Attempt:
    """One offer/answer round and how it ended."""

    policy: str  # "all" or "relay"
    gathered: list[str] = field(default_factory=list)  # local candidate types
    error: str | None = None


@dataclass
class Result:
    """What the peer reports to the test as JSON."""

    role: str
    ok: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    selected: dict[str, Any] | None = None
    payload_bytes: int = 0
    sha256: str | None = None
    transfer_s: float | None = None
    mb_per_s: float | None = None
    connect_s: float | None = None
    error: str | None = None


class Signal:
    """Session descriptions through a shared directory: atomic writes, polled reads."""

    def __init__(self, directory: Path, role: str) -> None:
        self.directory = directory
        self.role = role
        self.other = "answerer" if role == "offerer" else "offerer"

    def send(self, kind: str, attempt: int, description: RTCSessionDescription) -> None:
        self._write(f"{kind}-{attempt}.json", {"sdp": description.sdp, "type": description.type})

    async def receive(self, kind: str, attempt: int) -> RTCSessionDescription:
        """Wait for the counterpart's description; PeerGaveUp as soon as it says bye instead."""
        path, bye = self.directory / f"{kind}-{attempt}.json", self.directory / f"bye-{self.other}.json"
        while not path.exists():
            if bye.exists():
                raise PeerGaveUp(json.loads(bye.read_text())["reason"])
            await asyncio.sleep(POLL_INTERVAL_S)
        data = json.loads(path.read_text())
        return RTCSessionDescription(sdp=data["sdp"], type=data["type"])

    def bye(self, reason: str) -> None:
        self._write(f"bye-{self.role}.json", {"reason": reason})

    def _write(self, name: str, data: dict[str, Any]) -> None:
        temporary = self.directory / f".{name}.tmp"
        temporary.write_text(json.dumps(data))
        temporary.replace(self.directory / name)


async def connect(args: argparse.Namespace, signal: Signal, result: Result) -> tuple[Link, RTCPeerConnection]:
    """Run attempts until one opens the link's channels; the fallback to relay-only is decided here."""
    relay_only = args.relay_only
    attempt_number = 0
    while True:
        attempt_number += 1
        attempt = Attempt(policy="relay" if relay_only else "all")
        result.attempts.append(attempt)
        pc = RTCPeerConnection(build_configuration(args.ice_servers, relay_only=relay_only))
        codec = ControlCodec([RECEIVED])
        link = Link(pc, peer=signal.other, codec=codec, settings=LinkSettings(open_timeout_s=args.ice_timeout_s))
        try:
            await _negotiate(pc, signal, attempt_number)
            attempt.gathered = sorted(candidate_types(pc.localDescription.sdp))
            logger.info("attempt %d (policy %s): local candidates %s", attempt_number, attempt.policy, attempt.gathered)
            await link.wait_open()
        except LinkError as exc:
            attempt.error = str(exc)
        except BaseException:
            await link.close()  # the counterpart gave up or the overall timeout hit: nothing left to try
            raise
        else:
            return link, pc
        await link.close()
        logger.warning("attempt %d (policy %s) failed: %s", attempt_number, attempt.policy, attempt.error)
        if relay_only or args.no_fallback or "relay" not in attempt.gathered:
            raise LinkError(explain_ice_failure(set(attempt.gathered), args.ice_servers, relay_only=relay_only))
        logger.info("falling back to relay-only: policy all failed with a relay candidate (notes pitfall 7)")
        relay_only = True


async def _negotiate(pc: RTCPeerConnection, signal: Signal, attempt: int) -> None:
    """Offer/answer through the signal directory; setLocalDescription waits for gathering (no trickle)."""
    if signal.role == "offerer":
        await pc.setLocalDescription(await pc.createOffer())
        signal.send("offer", attempt, pc.localDescription)
        await pc.setRemoteDescription(await signal.receive("answer", attempt))
    else:
        await pc.setRemoteDescription(await signal.receive("offer", attempt))
        await pc.setLocalDescription(await pc.createAnswer())
        signal.send("answer", attempt, pc.localDescription)


async def send(link: Link, size: int, result: Result) -> None:
    """Send random bytes; the transfer ends when the answerer acknowledges the checksum it computed."""
    data = os.urandom(size)
    result.sha256 = hashlib.sha256(data).hexdigest()
    started = time.monotonic()
    payload_id = await link.send_payload(data)
    record = await link.recv_control()
    result.transfer_s = time.monotonic() - started
    if record["payload_id"] != payload_id or record["sha256"] != result.sha256:
        raise LinkError(f"answerer acknowledged {record}, expected payload {payload_id} with {result.sha256}")
    result.payload_bytes = size


async def receive(link: Link, result: Result) -> None:
    """Receive one payload (the link verified its checksum), acknowledge it, wait for the offerer to close."""
    started = time.monotonic()
    payload_id, data = await link.recv_payload()
    result.transfer_s = time.monotonic() - started
    result.payload_bytes = len(data)
    result.sha256 = hashlib.sha256(data).hexdigest()
    link.send_control({"type": RECEIVED.type, "payload_id": payload_id, "sha256": result.sha256})
    try:
        await asyncio.wait_for(link.wait_closed(), CLOSE_TIMEOUT_S)
    except TimeoutError:
        logger.warning("offerer did not close within %s s after the acknowledgement", CLOSE_TIMEOUT_S)


async def run(args: argparse.Namespace) -> Result:
    """Connect, move the payload, and always say bye and close, whatever failed."""
    signal = Signal(args.signal_dir, args.role)
    result = Result(role=args.role)
    started = time.monotonic()
    link: Link | None = None
    try:
        async with asyncio.timeout(args.timeout_s):
            link, pc = await connect(args, signal, result)
            result.connect_s = time.monotonic() - started
            result.selected = selected_pair(pc)
            logger.info("connected in %.2f s over %s", result.connect_s, result.selected)
            if args.role == "offerer":
                await send(link, args.payload_bytes, result)
            else:
                await receive(link, result)
        if result.transfer_s:
            result.mb_per_s = result.payload_bytes / result.transfer_s / 1e6
        result.ok = True
        logger.info("moved %d bytes in %.2f s (%.1f MB/s)", result.payload_bytes, result.transfer_s, result.mb_per_s)
    except (LinkError, PeerGaveUp, TimeoutError) as exc:
        reason = str(exc) or f"no result within --timeout-s={args.timeout_s}"
        result.error = f"counterpart gave up: {reason}" if isinstance(exc, PeerGaveUp) else reason
        logger.error("%s failed: %s", args.role, result.error)
        if not isinstance(exc, PeerGaveUp):
            signal.bye(result.error)
    finally:
        if link is not None:
            await link.close()
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["offerer", "answerer"], required=True)
    parser.add_argument("--signal-dir", type=Path, required=True, help="directory shared with the counterpart")
    parser.add_argument("--ice-servers", type=json.loads, required=True, help="JSON list as the server hands out")
    parser.add_argument("--result", type=Path, required=True, help="where to write the result JSON")
    parser.add_argument("--relay-only", action="store_true", help="policy relay from the first attempt")
    parser.add_argument("--no-fallback", action="store_true", help="do not retry relay-only when ICE fails")
    parser.add_argument("--payload-bytes", type=int, default=2 * 2**20, help="what the offerer sends")
    parser.add_argument("--ice-timeout-s", type=float, default=30.0, help="per attempt, until channels open")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="everything, attempts included")
    parser.add_argument(
        "--stun-retransmissions",
        type=int,
        default=STUN_RETRANSMISSIONS,
        help="for gathering (STUN, TURN): aioice's default of 6 (63.5 s per transaction) takes minutes to fail",
    )
    parser.add_argument(
        "--unbounded-checks",
        action="store_true",
        help="leave connectivity checks at aioice's retransmissions, as the mesh did before ice_timing.py",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {args.role} %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("aioice").setLevel(logging.WARNING)
    aioice.stun.RETRY_MAX = args.stun_retransmissions
    if not args.unbounded_checks:
        bound_connectivity_checks()  # as the mesh does: a doomed attempt fails in seconds
    result = asyncio.run(run(args))
    temporary = args.result.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(result), indent=1))
    temporary.replace(args.result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
