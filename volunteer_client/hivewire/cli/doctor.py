"""`hivewire doctor RUN_URL`: can this computer take part in a run? Joins, then checks the network step by step.

1. server reachable, join accepted, certificate verified;
2. ICE gathering with the join's ICE servers: which candidate types appear (host, srflx, relay);
3. STUN reachability and the NAT's mapping behaviour (two STUN destinations from one socket);
4. TURN: a real allocation with the join's credentials;
5. a live peer: whether the server knows one to test a link with.

Each step prints one ✓/✗ line and, when something is wrong, one sentence of advice; the verdict decides the
exit status: 0 when this computer can take part (directly or through the TURN relay), 1 when it cannot.
Steps 2–4 run at once with lowered STUN retransmissions, so the doctor ends within about 10 s of the join
even when UDP is blocked and every probe has to time out.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from aioice.stun import TransactionFailed, TransactionTimeout

from hivewire._text import printable
from hivewire.cli._common import open_api, resolve
from hivewire.cli.join import JoinedRun, join_run, parse_run_url
from hivewire.diagnostics import (
    STUN_RETRANSMISSIONS,
    MappingBehaviour,
    candidate_types,
    gather_local_description,
    mapping_behaviour,
    stun_endpoints,
    stun_mapped_addresses,
    stun_retransmissions,
    turn_allocation,
    turn_servers,
)
from hivewire.errors import ConfigError, HivewireError
from hivewire.mesh import IceConfigError, restrict_host_addresses

# Bounds per stage, in seconds; the probes inside them give up on their own first (aioice: 5 s per server
# query while gathering; STUN_RETRANSMISSIONS: 7.5 s per STUN or TURN transaction).
GATHER_TIMEOUT_S = 10.0
STUN_TIMEOUT_S = 12.0  # the mapping check, its quick recheck of the first server included
TURN_TIMEOUT_S = 10.0
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
    code: str  # direct-and-relay, direct, relay, local-only, udp-blocked, no-candidates, server
    summary: str


def command(
    ctx: typer.Context,
    run_url: Annotated[str, typer.Argument(help="The run's URL, as shown on its page: https://host/runs/<name>")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON document")] = False,
    host_address: Annotated[
        list[str] | None,
        typer.Option(
            help="Gather host candidates only on this address or interface (repeatable) [default: all but loopback]"
        ),
    ] = None,
) -> None:
    """Check whether this computer can take part in a run: server, ICE candidates, NAT, TURN relay, peers."""
    server, slug = parse_run_url(run_url)
    config = resolve(ctx, server=server)
    if host_address:
        try:
            restrict_host_addresses(host_address)
        except IceConfigError as exc:
            raise ConfigError(f"--host-address: {exc}") from exc
    checks: list[Check] = []
    member: JoinedRun | None = None
    with open_api(ctx, config, signed_in=True) as api:  # not signed in: the standard advice, exit 1
        try:
            member = join_run(api, config.key_path, slug)
        except HivewireError as exc:
            checks.append(Check("server", "Server and join", Status.FAIL, str(exc), exc.advice))
    if member is not None:
        ice_servers = [ice.model_dump(exclude_none=True) for ice in member.joined.ice_servers]
        checks.append(_server_check(config.server or server, member))
        checks.extend(asyncio.run(network_checks(ice_servers)))
        checks.append(_peer_check(member.joined.initial_peers))
    verdict = decide(checks)
    report = {
        "run_url": run_url,
        "server": config.server,
        "run": slug,
        "peer_id": member.identity.peer_id if member else None,
        "checks": [asdict(check) for check in checks],
        "verdict": asdict(verdict),
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(config.server or server, slug, checks, verdict)
    raise typer.Exit(0 if verdict.can_take_part else 1)


def _server_check(server: str, member: JoinedRun) -> Check:
    joined, certificate = member.joined, member.certificate
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


async def network_checks(ice_servers: list[dict[str, Any]]) -> list[Check]:
    """Steps 2–4 at once: they use separate sockets, and with UDP blocked each has to wait for its timeout."""
    with stun_retransmissions(STUN_RETRANSMISSIONS):
        return list(
            await asyncio.gather(check_candidates(ice_servers), check_nat(ice_servers), check_turn(ice_servers))
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
        return Check("candidates", title, Status.WARN, f"{summary}: the run hands out no STUN or TURN server", advice)
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


def _peer_check(initial_peers: list[str]) -> Check:
    """Step 5: a link to a live peer needs one; none is not a failure (the first volunteer sees none)."""
    if not initial_peers:
        return Check("peer", "Live peer", Status.SKIP, "no live peer to test")
    return Check(
        "peer",
        "Live peer",
        Status.SKIP,
        f"{len(initial_peers)} live peer(s) known; this client does not test links to them yet",
        details={"initial_peers": initial_peers},
    )


def decide(checks: list[Check]) -> Verdict:
    """Take part when any path works: a server-reflexive candidate (direct) or a relay (TURN)."""
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


def _print_report(server: str, slug: str, checks: list[Check], verdict: Verdict) -> None:
    typer.echo(f"Checking run {slug} on {server}")
    for number, check in enumerate(checks, start=1):
        typer.echo(f"{check.status.mark} {number}. {check.title}: {check.summary}")
        if check.advice:
            typer.echo(f"     → {check.advice}")
    typer.echo(f"{'✓' if verdict.can_take_part else '✗'} This computer {verdict.summary}.")


def _has_stun_or_turn(ice_servers: list[dict[str, Any]]) -> bool:
    return any(str(url).startswith(("stun", "turn")) for server in ice_servers for url in server["urls"])
