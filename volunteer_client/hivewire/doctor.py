"""The checks behind `hivewire doctor`: what this computer's network allows in a run, step by step.

1. server reachable, join accepted, certificate verified (the command does the join; `server_check` reports);
2. ICE gathering with the join's ICE servers: which candidate types appear (host, srflx, relay);
3. STUN reachability and the NAT's mapping behaviour (two STUN destinations from one socket);
4. TURN: a real allocation with the join's credentials;
5. a link to a live peer through the run's signaling: round-trip time and the candidate pair it used.

Steps 2–5 run at once with lowered STUN retransmissions, so they end within about 15 s even when UDP is
blocked and every probe has to time out. `decide` turns the steps into the verdict and the exit status.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from aioice.stun import TransactionFailed, TransactionTimeout

from hivewire._text import printable
from hivewire.api import JoinResponse
from hivewire.diagnostics import (
    STUN_RETRANSMISSIONS,
    MappingBehaviour,
    candidate_types,
    gather_local_description,
    mapping_behaviour,
    nominated_pair,
    stun_endpoints,
    stun_mapped_addresses,
    stun_retransmissions,
    turn_allocation,
    turn_servers,
)
from hivewire.errors import HivewireError
from hivewire.identity import CertificateVerifier, PeerCertificate, PeerIdentity
from hivewire.mesh import Link, LinkSettings, MeshError
from hivewire.mesh.manager import Mesh, MeshSettings
from hivewire.signaling import DescriptionVerifier, SignalingClient, SignalingSettings

__all__ = [
    "Check",
    "PeerProbe",
    "Status",
    "Verdict",
    "decide",
    "network_checks",
    "server_check",
]

# Bounds per stage, in seconds; the probes inside them give up on their own first (aioice: 5 s per server
# query while gathering; STUN_RETRANSMISSIONS: 7.5 s per STUN or TURN transaction).
GATHER_TIMEOUT_S = 10.0
STUN_TIMEOUT_S = 12.0  # the mapping check, its quick recheck of the first server included
TURN_TIMEOUT_S = 10.0
PEER_LINK_TIMEOUT_S = 15.0  # signaling, signed offer and answer, ICE, DTLS and SCTP, and the RTT samples
SIGNALING_START_TIMEOUT_S = 5.0  # until the server's welcome on the signaling WebSocket
PEER_PING_INTERVAL_S = 0.2  # keepalive pings on the test link; each pong is one RTT sample
PEER_RTT_SAMPLES = 5
# Retransmissions of the recheck that tells "first STUN server silent" from "second one silent" (1.5 s).
STUN_RECHECK_RETRANSMISSIONS = 1

TURN_ERROR_ADVICE = {
    401: (
        "The TURN server refused the run's credentials: tell the organizer that the server's TURN_SECRET must "
        "equal coturn's static-auth-secret (and check that this computer's clock is right)."
    ),
    403: "The TURN server forbids this allocation: tell the organizer (coturn's allowed and denied peer ranges).",
    437: "The TURN server refused a duplicate allocation: run the doctor again in a minute.",
    486: "The TURN server's allocation quota for this user is used up: close other Hivewire clients or wait.",
    508: "The TURN server is out of relay ports: tell the organizer to raise coturn's port range.",
}


class Status(StrEnum):
    """How a step ended; `mark` is what a person sees in front of the line."""

    OK = "ok"
    WARN = "warn"  # works, with a limit worth knowing
    FAIL = "fail"
    SKIP = "skip"  # nothing to check (no TURN configured, no live peer): never a failure on its own

    @property
    def mark(self) -> str:
        return {"ok": "✓", "warn": "!", "fail": "✗", "skip": "-"}[self.value]


@dataclass
class Check:
    """One step of the report."""

    step: str  # machine-readable name: server, candidates, nat, turn, peer
    title: str
    status: Status
    summary: str
    advice: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verdict:
    """Whether this computer can take part, and how."""

    can_take_part: bool
    code: str  # direct-and-relay, direct, relay, linked, local-only, udp-blocked, no-candidates, server
    summary: str


@dataclass(frozen=True)
class PeerProbe:
    """What the link test needs: the live peers to try and a throwaway identity joined to the run.

    Throwaway, because a second signaling connection under this machine's peer id would replace (close
    with 4009) the one of a Hivewire client training here.
    """

    server: str  # the server URL, issuer of the certificates the peers present
    identity: PeerIdentity
    joined: JoinResponse  # the throwaway identity's join: certificate and signaling URL
    peers: Sequence[str]  # live peers named by this machine's join, tried in order


def server_check(server: str, joined: JoinResponse, certificate: PeerCertificate) -> Check:
    """Step 1, once the join and its certificate passed every check."""
    minutes = int((certificate.expires_at - datetime.now(UTC)).total_seconds() // 60)
    urls = [url for ice in joined.ice_servers for url in ice.urls]
    counts = {scheme: sum(url.startswith(scheme) for url in urls) for scheme in ("stun", "turn")}
    listed = ", ".join(f"{count} {scheme.upper()}" for scheme, count in counts.items() if count) or "none"
    return Check(
        "server",
        "Server and join",
        Status.OK,
        f"{server} reachable; joined run {printable(joined.run.name, 100)} as {joined.peer_id}; certificate verified, "
        f"valid {minutes} min; ICE servers: {listed}",
        details={
            "certificate_expires_at": certificate.expires_at.isoformat(),
            "ice_urls": urls,
            "initial_peers": len(joined.initial_peers),
        },
    )


async def network_checks(ice_servers: list[dict[str, Any]], probe: PeerProbe | None) -> list[Check]:
    """Steps 2–5 at once: they use separate sockets, and with UDP blocked each has to wait for its timeout.

    STUN retransmissions are lowered for all of them (process-wide while they run; the doctor is alone in
    its process), so a TURN allocation or an ICE check gives up after 7.5 s instead of 63.5 s.
    """
    with stun_retransmissions(STUN_RETRANSMISSIONS):
        return list(
            await asyncio.gather(
                check_candidates(ice_servers),
                check_nat(ice_servers),
                check_turn(ice_servers),
                check_peer(ice_servers, probe),
            )
        )


async def check_candidates(ice_servers: list[dict[str, Any]]) -> Check:
    """Step 2: gather as a link would, and read the candidate types off the offer."""
    title = "ICE candidates"
    try:
        sdp = await asyncio.wait_for(gather_local_description(ice_servers), GATHER_TIMEOUT_S)
    except TimeoutError:
        return Check("candidates", title, Status.FAIL, f"gathering did not finish within {GATHER_TIMEOUT_S} s")
    types = candidate_types(sdp)
    found = [kind for kind in ("host", "srflx", "prflx", "relay") if kind in types]
    details: dict[str, Any] = {"types": found}
    summary = f"gathered {', '.join(found) or 'no'} candidates"
    if not found:
        advice = "Check that a network interface is up (and, with --host-address, that it names one of them)."
        return Check("candidates", title, Status.FAIL, summary, advice, details)
    if "srflx" in types or "relay" in types:
        return Check("candidates", title, Status.OK, summary, details=details)
    if not _has_stun_or_turn(ice_servers):
        advice = "Only peers on your own network can reach you: ask the organizer to configure STUN and TURN."
        summary = f"{summary}: the run hands out no STUN or TURN server"
        return Check("candidates", title, Status.WARN, summary, advice, details)
    return Check(
        "candidates",
        title,
        Status.FAIL,
        f"{summary} only: neither the STUN nor the TURN server answered over UDP",
        "UDP to the STUN and TURN servers seems blocked: see steps 3 and 4.",
        details,
    )


async def check_nat(ice_servers: list[dict[str, Any]]) -> Check:
    """Step 3: the public address seen by two STUN destinations from one socket; equal means cone NAT."""
    title = "STUN and NAT mapping"
    try:
        endpoints = (await stun_endpoints(ice_servers))[:2]
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        return Check("nat", title, Status.FAIL, f"cannot resolve the STUN server: {exc}", "Check your DNS settings.")
    if not endpoints:
        return Check("nat", title, Status.SKIP, "no STUN server configured: NAT behaviour unknown")
    shown = [f"{host}:{port}" for host, port in endpoints]
    unknown_because = "only one STUN address configured"
    try:
        async with asyncio.timeout(STUN_TIMEOUT_S):
            try:
                mapped = await stun_mapped_addresses(endpoints)
            except TransactionTimeout:
                if len(endpoints) < 2:
                    raise
                # Was it the second destination that stayed silent? Then the first still tells our address.
                mapped = await stun_mapped_addresses(endpoints[:1], retransmissions=STUN_RECHECK_RETRANSMISSIONS)
                unknown_because = f"the second STUN address {shown.pop()} did not answer"
    except (TransactionTimeout, TimeoutError, OSError):
        port = endpoints[0][1]
        return Check(
            "nat",
            title,
            Status.FAIL,
            f"the STUN server {shown[0]} did not answer over UDP",
            f"UDP to the STUN server is blocked: allow outbound UDP {port}, or ask the organizer for TURN over TCP.",
            {"servers": shown},
        )
    details: dict[str, Any] = {"servers": shown, "mapped": [f"{host}:{port}" for host, port in mapped]}
    public = details["mapped"][0]
    if len(mapped) < 2:
        details["behaviour"] = "unknown"
        summary = (
            f"STUN {shown[0]} answered, public address {public}; mapping behaviour unknown "
            f"({unknown_because}, two answers are needed to compare)"
        )
        return Check("nat", title, Status.OK, summary, details=details)
    behaviour = mapping_behaviour(mapped)
    details["behaviour"] = str(behaviour)
    if behaviour is MappingBehaviour.ENDPOINT_INDEPENDENT:
        summary = f"public address {public} towards {' and '.join(shown)}: endpoint-independent mapping"
        return Check("nat", title, Status.OK, f"{summary}, peers can reach you directly", details=details)
    return Check(
        "nat",
        title,
        Status.WARN,
        f"public address changes per destination ({', '.join(details['mapped'])}): address/port-dependent "
        "mapping (symmetric NAT), direct links fail with peers behind the same kind of NAT",
        "Links to some peers need the TURN relay (step 4); a router with UPnP or endpoint-independent "
        "mapping would allow direct links.",
        details,
    )


async def check_turn(ice_servers: list[dict[str, Any]]) -> Check:
    """Step 4: allocate a relay on the first TURN URL (the only one aiortc uses) with the join's credentials."""
    title = "TURN relay"
    servers = turn_servers(ice_servers)
    if not servers:
        return Check("turn", title, Status.SKIP, "no TURN server configured: peers behind symmetric NATs need one")
    server = servers[0]
    details: dict[str, Any] = {"url": server.url}
    over = f"{'TLS' if server.tls else server.transport.upper()} {server.port}"
    try:
        relayed = await asyncio.wait_for(turn_allocation(server), TURN_TIMEOUT_S)
    except TransactionFailed as exc:
        code, reason = exc.response.attributes.get("ERROR-CODE", (0, "unknown error"))
        details["error_code"] = code
        advice = TURN_ERROR_ADVICE.get(code, "Tell the organizer what the TURN server answered (above).")
        return Check(
            "turn", title, Status.FAIL, f"{server.url} refused the allocation: {code} {reason}", advice, details
        )
    except (TransactionTimeout, TimeoutError):
        return Check(
            "turn",
            title,
            Status.FAIL,
            f"{server.url} did not answer over {over}",
            f"{server.transport.upper()} to the TURN server is blocked: allow outbound {over}, "
            "or ask the organizer for TURN over TCP or TLS (turns:, port 443).",
            details,
        )
    except (OSError, ConnectionError) as exc:
        return Check(
            "turn",
            title,
            Status.FAIL,
            f"cannot connect to {server.url}: {exc}",
            f"Allow outbound {over} to the TURN server, or tell the organizer it is down.",
            details,
        )
    details["relayed"] = f"{relayed[0]}:{relayed[1]}"
    return Check("turn", title, Status.OK, f"{server.url} allocated relay {details['relayed']}", details=details)


async def check_peer(ice_servers: list[dict[str, Any]], probe: PeerProbe | None) -> Check:
    """Step 5: link to a live peer as the mesh would (signed offer, ICE, DTLS) and time keepalive round trips.

    Throughput is not measured: a live peer's mesh has no record for test traffic, and bulk payloads are
    not tagged by consumer, so bytes sent to it would sit in its queue. None to try is not a failure (the
    first volunteer sees none), and neither is a peer that left since the join named it.
    """
    title = "Live peer"
    if probe is None or not probe.peers:
        return Check("peer", title, Status.SKIP, "no live peer to test")
    certificate = probe.joined.certificate
    certificates = CertificateVerifier(probe.server)
    mesh = Mesh(
        probe.identity,
        lambda: certificate,
        DescriptionVerifier(certificates, run=probe.joined.run.slug, self_peer_id=probe.identity.peer_id),
        ice_servers=ice_servers,
        signaling=SignalingClient(
            probe.joined.signaling_url,
            lambda: certificate,
            settings=SignalingSettings(start_timeout_s=SIGNALING_START_TIMEOUT_S),
        ),
        settings=MeshSettings(
            max_neighbours=1,
            answer_timeout_s=PEER_LINK_TIMEOUT_S,
            link=LinkSettings(open_timeout_s=PEER_LINK_TIMEOUT_S, keepalive_interval_s=PEER_PING_INTERVAL_S),
        ),
    )
    failures: list[str] = []
    try:
        async with asyncio.timeout(PEER_LINK_TIMEOUT_S):
            await mesh.start()
            for peer in probe.peers:
                try:
                    link = await mesh.connect(peer)
                except MeshError as exc:
                    failures.append(f"{peer}: {exc}")
                    continue
                return await _timed_link(link)
    except TimeoutError:
        failures.append(f"no link within {PEER_LINK_TIMEOUT_S} s")
    except HivewireError as exc:  # signaling refused or unreachable
        failures.append(f"signaling: {exc}")
    finally:
        await mesh.close()
        certificates.close()
    return Check(
        "peer",
        title,
        Status.WARN,
        f"no link to the {len(probe.peers)} live peer(s) the server named: {'; '.join(failures)}",
        "If steps 2 to 4 passed, the peers may have left or be the ones that cannot connect; try again later.",
        {"failures": failures},
    )


async def _timed_link(link: Link) -> Check:
    """RTT samples from the link's keepalive pongs, and the candidate pair ICE nominated."""
    samples: list[float] = []
    while len(samples) < PEER_RTT_SAMPLES:
        await asyncio.sleep(PEER_PING_INTERVAL_S)
        if link.rtt_s is not None:
            samples.append(link.rtt_s)
    assert link.control_channel.transport is not None  # an open channel has its SCTP transport
    pair = nominated_pair(link.control_channel.transport)
    rtt_ms = statistics.median(samples) * 1000
    path = "through the TURN relay" if "relay" in (pair["local"], pair["remote"]) else "directly"
    return Check(
        "peer",
        "Live peer",
        Status.OK,
        f"linked to {link.peer} {path} ({pair['local']} to {pair['remote']}), round trip {rtt_ms:.1f} ms; "
        "throughput not measured",
        details={"peer": link.peer, "pair": pair, "rtt_ms": round(rtt_ms, 2)},
    )


def decide(checks: list[Check]) -> Verdict:
    """Take part when a live peer linked, or when a path exists: a server-reflexive candidate or a relay."""
    by_step = {check.step: check for check in checks}
    if by_step["server"].status is Status.FAIL:
        return Verdict(False, "server", "cannot take part: joining the run failed (step 1)")
    candidates = by_step["candidates"]
    types = set(candidates.details.get("types", []))
    direct = "srflx" in types
    relay = by_step["turn"].status is Status.OK or "relay" in types
    if direct and relay:
        return Verdict(True, "direct-and-relay", "can take part: directly, and through the TURN relay where needed")
    if direct and by_step["nat"].details.get("behaviour") == MappingBehaviour.ENDPOINT_DEPENDENT:
        return Verdict(
            True, "direct", "can take part directly only with peers behind open or cone NATs (yours is symmetric)"
        )
    if direct:
        return Verdict(
            True,
            "direct",
            "can take part directly; without a TURN relay, peers behind symmetric NATs stay out of reach",
        )
    if relay:
        return Verdict(True, "relay", "can take part through the TURN relay only (slower than direct links)")
    if by_step["peer"].status is Status.OK:
        return Verdict(True, "linked", "can take part: it linked to a live peer, though no STUN or TURN answered")
    if candidates.status is Status.WARN:
        return Verdict(True, "local-only", "can take part with peers on your own network only (no STUN or TURN)")
    if not types:
        return Verdict(False, "no-candidates", "cannot take part: no network address to offer peers")
    return Verdict(
        False,
        "udp-blocked",
        "cannot take part: UDP is blocked, no STUN or TURN server answered; open outbound UDP or ask the "
        "organizer for TURN over TCP/TLS",
    )


def _has_stun_or_turn(ice_servers: list[dict[str, Any]]) -> bool:
    return any(str(url).startswith(("stun", "turn")) for server in ice_servers for url in server["urls"])
