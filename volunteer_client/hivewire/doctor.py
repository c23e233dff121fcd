"""The checks behind `hivewire doctor`: what this computer's network allows in a run, step by step.

1. server reachable, join accepted, certificate verified (the command does the join; `server_check` reports);
2. ICE gathering with the join's ICE servers: which candidate types appear (host, srflx, relay);
3. STUN reachability and the NAT's mapping behaviour (two STUN destinations from one socket);
4. TURN: a real allocation with the join's credentials;
5. the data path this client would use: tuned SCTP on or off (and why), the event loop, the direct TLS path;
6. a link to a live peer through the run's signaling: the path its bulk payloads take (direct TLS, WebRTC
   host, server- or peer-reflexive, TURN relay), round-trip time, and a short throughput probe.

Steps 2–4 and 6 run at once with lowered STUN retransmissions, so they end within about 15 s even when UDP
is blocked and every probe has to time out; a live peer to link to may take up to 30 s (two ICE attempts
and a relay-only retry), and a linked one adds the direct path's settling and the probe (at most 13 s).
`decide` turns the steps into the verdict and the exit status.

The throughput probe sends bulk payloads only to a peer that asked for them: bulk payloads are not tagged
by consumer, so bytes a peer did not expect would sit in its queue holding credit. The doctor sends one
``doctor_probe`` record; a peer running a :class:`ProbeResponder` (a volunteer's network side runs one,
for peers outside the run's progress view, one probe per 10 s) answers ``doctor_probe_ready`` and drains
what follows; a peer that is busy with another probe, or an older client, does not answer, and the doctor
reports the throughput as not measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import aiortc
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
from hivewire.mesh import DirectSettings, Link, LinkError, LinkSettings, MeshError, RecordSchema
from hivewire.mesh.control import ControlRecordError
from hivewire.mesh.manager import Mesh, MeshSettings
from hivewire.mesh.tuning import (
    ENV_SWITCH,
    TUNED_AIORTC_VERSION,
    apply_sctp_tuning,
    remove_sctp_tuning,
    sctp_tuning_active,
)
from hivewire.signaling import DescriptionVerifier, SignalingClient, SignalingSettings

__all__ = [
    "PATH_LABELS",
    "PROBE_SCHEMAS",
    "Check",
    "PeerProbe",
    "ProbeResponder",
    "Status",
    "Verdict",
    "decide",
    "link_path",
    "network_checks",
    "server_check",
    "throughput_summary",
    "transport_check",
]

logger = logging.getLogger(__name__)

# Bounds per stage, in seconds; the probes inside them give up on their own first (aioice: 5 s per server
# query while gathering; STUN_RETRANSMISSIONS: 7.5 s per STUN or TURN transaction).
GATHER_TIMEOUT_S = 10.0
STUN_TIMEOUT_S = 12.0  # the mapping check, its quick recheck of the first server included
TURN_TIMEOUT_S = 10.0
# Signaling, signed offer and answer, ICE, DTLS and SCTP, and the RTT samples: room for two ICE failures
# (the peer's offer, then ours under policy all) and our relay-only retry, which two symmetric NATs need.
PEER_LINK_TIMEOUT_S = 30.0
PEER_CONNECT_ATTEMPTS = 2
SIGNALING_START_TIMEOUT_S = 5.0  # until the server's welcome on the signaling WebSocket
PEER_PING_INTERVAL_S = 0.2  # keepalive pings on the test link; each pong is one RTT sample
PEER_RTT_SAMPLES = 5
DIRECT_SETTLE_TIMEOUT_S = 4.0  # from the link open until the direct TLS path is up, unreachable or refused
# The throughput probe: bulk payloads of PROBE_PAYLOAD_BYTES until PROBE_MAX_BYTES or PROBE_TIME_CAP_S,
# whichever comes first, then at most PROBE_FLUSH_TIMEOUT_S until the peer took the last of them.
PROBE_MAX_BYTES = 8 * 2**20
PROBE_PAYLOAD_BYTES = 256 * 2**10  # ≥ 64 KiB, so the link's own rate samples count them too
PROBE_TIME_CAP_S = 5.0
PROBE_FLUSH_TIMEOUT_S = 3.0
PROBE_ANSWER_TIMEOUT_S = 1.0  # for doctor_probe_ready; a peer without a responder never answers
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


def _check_probe_bytes(record: Mapping[str, Any]) -> None:
    if not 0 <= record["bytes"] <= PROBE_MAX_BYTES:
        raise ControlRecordError(f"{record['type']}.bytes: {record['bytes']} is outside 0..{PROBE_MAX_BYTES}")


# The probe's records: a Mesh that takes part (the doctor's, a ProbeResponder's) registers both.
PROBE_REQUEST = RecordSchema("doctor_probe", {"bytes": int}, _check_probe_bytes)
PROBE_READY = RecordSchema("doctor_probe_ready", {"bytes": int}, _check_probe_bytes)
PROBE_SCHEMAS = (PROBE_REQUEST, PROBE_READY)

# How a link's bulk payloads travel, most direct first; the labels are what a person reads.
PATH_LABELS = {
    "direct-tls": "direct TLS",
    "webrtc-host": "WebRTC host",
    "webrtc-srflx": "WebRTC server-reflexive",
    "webrtc-prflx": "WebRTC peer-reflexive",
    "turn-relay": "TURN relay",
}


def link_path(direct: bool, local_type: str, remote_type: str) -> str:
    """The path of a link's bulk payloads: direct TLS when its stream is up, else the ICE pair's kind.

    A relay at either end means every packet crosses the TURN server; otherwise a reflexive end means a
    NAT was traversed (server-reflexive: learned from STUN; peer-reflexive: learned during the checks).
    """
    if direct:
        return "direct-tls"
    types = {local_type, remote_type}
    for kind, path in (("relay", "turn-relay"), ("srflx", "webrtc-srflx"), ("prflx", "webrtc-prflx")):
        if kind in types:
            return path
    return "webrtc-host"


def throughput_summary(total_bytes: int, seconds: float, *, complete: bool) -> tuple[float, str]:
    """MB/s (10**6 bytes) of a probe and how to say it; an incomplete probe is an upper bound."""
    rate = total_bytes / seconds / 1e6 if seconds > 0 else 0.0
    moved = f"{total_bytes / 1e6:.1f} MB in {seconds:.2f} s"
    if complete:
        return rate, f"throughput {rate:.1f} MB/s ({moved})"
    return rate, f"throughput under {rate:.1f} MB/s (the peer had not taken all of {moved})"


def transport_check(
    *, tuned: bool, aiortc_version: str, setting: str | None, event_loop: str, direct_enabled: bool
) -> Check:
    """Step 5: what the data path runs on; tuned SCTP off is a warning (slower), never a failure.

    ``setting`` is HIVEWIRE_SCTP_TUNING as found (None: unset), ``event_loop`` the running loop's module.
    """
    direct = "direct TLS path enabled" if direct_enabled else "direct TLS path disabled"
    loop = "uvloop" if event_loop == "uvloop" else "asyncio event loop (uvloop not installed)"
    details: dict[str, Any] = {
        "sctp_tuning": tuned,
        "aiortc": aiortc_version,
        "tuned_for_aiortc": TUNED_AIORTC_VERSION,
        "sctp_tuning_setting": setting,
        "event_loop": event_loop,
        "direct_path": direct_enabled,
    }
    title = "Data path"
    if tuned:
        summary = f"tuned SCTP active (aiortc {aiortc_version}), {loop}; {direct}"
        return Check("transport", title, Status.OK, summary, details=details)
    if setting is not None and setting.strip().lower() in ("off", "0", "false", "no"):
        why = f"{ENV_SWITCH}={setting}"
        advice = f"Unset {ENV_SWITCH} unless you were asked to turn the tuning off: untuned links are slower."
    elif aiortc_version != TUNED_AIORTC_VERSION:
        why = f"aiortc {aiortc_version} is installed, the tuning is written for {TUNED_AIORTC_VERSION}"
        advice = (
            f"Install aiortc {TUNED_AIORTC_VERSION} (pip install aiortc=={TUNED_AIORTC_VERSION}) to get the tuned path."
        )
    else:
        why = f"this aiortc {aiortc_version} lacks what the tuning adjusts"
        advice = "Reinstall Hivewire's pinned aiortc; see the warning logged above."
    summary = f"tuned SCTP off ({why}): data channels run at aiortc's default speed, {loop}; {direct}"
    return Check("transport", title, Status.WARN, summary, advice, details)


class ProbeResponder:
    """Takes the doctor's throughput probes on a mesh: answers ``doctor_probe`` and drains the payloads.

    For a peer whose bulk payloads have no other reader on the probing link: a test's peer, a bench, or a
    network side that routes a probing link (a peer that is no group member) here. One probe at a time;
    each is bounded by PROBE_MAX_BYTES (the record's schema) and by the probe's time caps, after which
    nothing more is read and the sender runs out of credit.
    """

    def __init__(self, mesh: Mesh, *, accept: Callable[[str], bool] = lambda peer: True) -> None:
        self._mesh = mesh
        self._accept = accept
        self._task: asyncio.Task[None] | None = None
        self.probes = 0  # probes answered, for tests and operators
        mesh.on_records([PROBE_REQUEST.type], self._on_probe)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _on_probe(self, sender: str, record: dict[str, Any]) -> None:
        link = self._mesh.link(sender)
        if link is None or not self._accept(sender) or (self._task is not None and not self._task.done()):
            logger.info("ignored a throughput probe from %s (busy, not accepted, or no link)", sender)
            return
        try:
            link.send_control({"type": PROBE_READY.type, "bytes": record["bytes"]})
        except LinkError as exc:
            logger.info("cannot answer the throughput probe from %s: %s", sender, exc)
            return
        self.probes += 1
        self._task = asyncio.get_running_loop().create_task(self._drain(link, record["bytes"]), name="hivewire-probe")

    async def _drain(self, link: Link, total: int) -> None:
        received = 0
        with contextlib.suppress(TimeoutError, LinkError):
            async with asyncio.timeout(PROBE_ANSWER_TIMEOUT_S + PROBE_TIME_CAP_S + PROBE_FLUSH_TIMEOUT_S):
                while received < total:
                    _, data = await link.recv_payload()
                    received += len(data)
        logger.info("throughput probe from %s: %d of %d bytes received", link.peer, received, total)


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
    """Steps 2–6: 2–4 and 6 at once (separate sockets; with UDP blocked each has to wait for its timeout).

    SCTP tuning is applied first, as the network process applies it, so the peer link runs the path a
    volunteer would get; the doctor takes it off again if it was the one that put it on. STUN
    retransmissions are lowered for all checks (process-wide while they run; the doctor is alone in its
    process), so a TURN allocation or an ICE check gives up after 7.5 s instead of 63.5 s.
    """
    applied_here = not sctp_tuning_active() and apply_sctp_tuning()
    try:
        transport = transport_check(
            tuned=sctp_tuning_active(),
            aiortc_version=str(getattr(aiortc, "__version__", "unknown")),
            setting=os.environ.get(ENV_SWITCH),
            event_loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],
            direct_enabled=DirectSettings().enabled,
        )
        with stun_retransmissions(STUN_RETRANSMISSIONS):
            candidates, nat, turn, peer = await asyncio.gather(
                check_candidates(ice_servers),
                check_nat(ice_servers),
                check_turn(ice_servers),
                check_peer(ice_servers, probe),
            )
        return [candidates, nat, turn, transport, peer]
    finally:
        if applied_here:
            remove_sctp_tuning()


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
    """Step 6: link to a live peer as the mesh would (signed offer, ICE, DTLS, direct TLS where it connects),
    time keepalive round trips, and probe the throughput if the peer takes probes (module docstring).

    None to try is not a failure (the first volunteer sees none), and neither is a peer that left since
    the join named it.
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
        schemas=PROBE_SCHEMAS,
    )
    answers: dict[str, asyncio.Future[int]] = {peer: asyncio.get_running_loop().create_future() for peer in probe.peers}

    def on_ready(sender: str, record: dict[str, Any]) -> None:
        answer = answers.get(sender)
        if answer is not None and not answer.done():
            answer.set_result(record["bytes"])

    mesh.on_records([PROBE_READY.type], on_ready)
    failures: list[str] = []
    try:
        link: Link | None = None
        observed: dict[str, Any] = {}
        async with asyncio.timeout(PEER_LINK_TIMEOUT_S):
            await mesh.start()
            for peer in probe.peers:
                link = await _connect(mesh, peer, failures)
                if link is None:
                    continue
                try:
                    observed = await _observe_link(link)
                    break
                except LinkError as exc:
                    failures.append(str(exc))
                    link = None
        if link is not None:
            return await _probed_check(link, observed, answers[link.peer])
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


async def _connect(mesh: Mesh, peer: str, failures: list[str]) -> Link | None:
    """Up to PEER_CONNECT_ATTEMPTS tries. The peer sees our join and may offer first; when that offer fails
    ICE, only our own offer retries relay-only (the mesh's fallback is the offerer's), as its would later."""
    for attempt in range(1, PEER_CONNECT_ATTEMPTS + 1):
        try:
            return await mesh.connect(peer)
        except MeshError as exc:
            failures.append(f"{peer} (try {attempt}): {exc}")
    return None


async def _observe_link(link: Link) -> dict[str, Any]:
    """RTT samples from the keepalive pongs, while the direct TLS path settles (up, unreachable, refused)."""
    loop = asyncio.get_running_loop()
    opened = loop.time()
    samples: list[float] = []
    while len(samples) < PEER_RTT_SAMPLES or (
        link.direct_state == "trying" and loop.time() - opened < DIRECT_SETTLE_TIMEOUT_S
    ):
        await asyncio.sleep(PEER_PING_INTERVAL_S)
        if link.closed:
            raise LinkError(f"link to {link.peer} closed after it opened: {link.dead_reason or 'closed'}")
        if link.rtt_s is not None:
            samples.append(link.rtt_s)
    transport = link.control_channel.transport
    try:
        if transport is None:
            raise RuntimeError("the control channel has no SCTP transport")
        pair = nominated_pair(transport)
    except RuntimeError as exc:  # the link failed between the last sample and now
        raise LinkError(f"link to {link.peer}: no candidate pair to report: {exc}") from exc
    path = link_path(link.path == "direct-tls", pair["local"], pair["remote"])
    return {
        "peer": link.peer,
        "pair": pair,
        "rtt_ms": round(statistics.median(samples[-PEER_RTT_SAMPLES:]) * 1000, 2),
        "path": path,
        "path_label": PATH_LABELS[path],
        "direct_state": link.direct_state,
    }


async def _probed_check(link: Link, details: dict[str, Any], ready: asyncio.Future[int]) -> Check:
    """The peer step's line: path, RTT and the throughput probe's result (or why there is none)."""
    pair = details["pair"]
    webrtc = f"{pair['local']} to {pair['remote']}"
    if details["path"] == "direct-tls":
        route = f"bulk over direct TLS (WebRTC control: {webrtc})"
    else:
        direct = "" if details["direct_state"] in ("off", "up") else f"; direct TLS {details['direct_state']}"
        route = f"bulk over {details['path_label']} ({webrtc}{direct})"
    details.update(await _probe_throughput(link, ready))
    summary = f"linked to {link.peer}: {route}, round trip {details['rtt_ms']:.1f} ms; {details['throughput']}"
    return Check("peer", "Live peer", Status.OK, summary, details=details)


async def _probe_throughput(link: Link, ready: asyncio.Future[int]) -> dict[str, Any]:
    """Ask for a probe; if the peer grants it, send payloads within the caps and time them until released.

    The clock stops when the peer released (took) every payload, so the figure is delivered bytes, not
    bytes handed to the local buffers.
    """
    result: dict[str, Any] = {"throughput_mb_s": None, "probe_bytes": 0, "probe_seconds": None, "probe_complete": False}
    try:
        link.send_control({"type": PROBE_REQUEST.type, "bytes": PROBE_MAX_BYTES})
        granted = min(await asyncio.wait_for(ready, PROBE_ANSWER_TIMEOUT_S), PROBE_MAX_BYTES)
    except TimeoutError:
        result["throughput"] = (
            "throughput not measured: the peer took no probe (it was answering another one, or its "
            "client is older than this one)"
        )
        return result
    except LinkError as exc:
        result["throughput"] = f"throughput not measured: {exc}"
        return result
    if granted == 0:
        result["throughput"] = "throughput not measured: the peer granted a probe of 0 bytes"
        return result
    payload = os.urandom(PROBE_PAYLOAD_BYTES)
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = 0
    complete = False
    try:
        async with asyncio.timeout(PROBE_TIME_CAP_S + PROBE_FLUSH_TIMEOUT_S):
            while sent < granted and loop.time() - started < PROBE_TIME_CAP_S:
                size = min(PROBE_PAYLOAD_BYTES, granted - sent)
                await link.send_payload(payload[:size])
                sent += size
            complete = await link.flush(PROBE_FLUSH_TIMEOUT_S)
    except TimeoutError:
        pass
    except LinkError as exc:
        result["throughput"] = f"throughput not measured: the link failed during the probe ({exc})"
        return result
    seconds = loop.time() - started
    if sent == 0:
        result["throughput"] = f"throughput not measured: no probe payload left within {seconds:.1f} s"
        return result
    rate, result["throughput"] = throughput_summary(sent, seconds, complete=complete)
    result.update(
        throughput_mb_s=round(rate, 2), probe_bytes=sent, probe_seconds=round(seconds, 3), probe_complete=complete
    )
    return result


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
