"""`hivewire doctor RUN_URL`: can this computer take part in a run? Joins, then checks the network step by step.

The checks live in `hivewire.doctor`; this module signs in, joins, and prints one ✓/✗ line per step with
one sentence of advice where something is wrong, then the verdict. Exit status 0 when this computer can
take part (directly or through the TURN relay), 1 when it cannot. `--json` prints the same as one document.
The checks run on the network process's event loop (`tuning.run`: uvloop where installed), so the link to
a live peer and its throughput are what a volunteer's client would get.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivewire.cli._common import open_api, resolve
from hivewire.cli.join import JoinedRun, join_run, parse_run_url
from hivewire.doctor import Check, PeerProbe, Status, Verdict, decide, network_checks, server_check
from hivewire.errors import ConfigError, HivewireError
from hivewire.identity import PeerIdentity
from hivewire.mesh import IceConfigError, restrict_host_addresses, tuning


def command(
    ctx: typer.Context,
    run_url: Annotated[str, typer.Argument(help="The run's URL, as shown on its page: https://host/runs/<name>")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON document")] = False,
    host_address: Annotated[
        list[str] | None,
        typer.Option(
            help="Gather host candidates only on this address or interface (repeatable; default: all but loopback)"
        ),
    ] = None,
) -> None:
    """Check whether this computer can take part in a run: server, ICE candidates, NAT, TURN relay, data path, peers.

    Prints one line per check, with one sentence of advice where a check fails.

    The link to a live peer says its path (direct TLS, WebRTC host or reflexive, TURN relay) and its round trip.

    Where that peer takes a short probe, the link's throughput too.

    Exits 0 when this computer can train in the run (directly or through the TURN relay), 1 when it cannot.

    Example: hivewire doctor https://hive.example.org/runs/tiny-lm
    """
    server, slug = parse_run_url(run_url)
    config = resolve(ctx, server=server)
    server = config.server or server
    if host_address:
        try:
            restrict_host_addresses(host_address)
        except IceConfigError as exc:
            raise ConfigError(f"--host-address: {exc}") from exc
    checks: list[Check] = []
    member: JoinedRun | None = None
    probe: PeerProbe | None = None
    with open_api(ctx, config, signed_in=True) as api:  # not signed in: the standard advice, exit 1
        try:
            member = join_run(api, config.key_path, slug)
            if member.joined.initial_peers:
                throwaway = _throwaway_identity()
                probe = PeerProbe(server, throwaway, api.join(slug, throwaway.peer_key), member.joined.initial_peers)
        except HivewireError as exc:
            member = None
            checks.append(Check("server", "Server and join", Status.FAIL, str(exc), exc.advice))
    if member is not None:
        checks.append(server_check(server, member.joined, member.certificate))
        ice_servers = [ice.model_dump(exclude_none=True) for ice in member.joined.ice_servers]
        checks.extend(tuning.run(network_checks(ice_servers, probe)))
    verdict = decide(checks)
    if as_json:
        report = {
            "run_url": run_url,
            "server": server,
            "run": slug,
            "peer_id": member.identity.peer_id if member else None,
            "checks": [asdict(check) for check in checks],
            "verdict": asdict(verdict),
        }
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(server, slug, checks, verdict)
    raise typer.Exit(0 if verdict.can_take_part else 1)


def _throwaway_identity() -> PeerIdentity:
    """A peer key for the link test only, never stored (see `hivewire.doctor.PeerProbe`)."""
    key = Ed25519PrivateKey.generate()
    return PeerIdentity(private_key=key, public_key_raw=key.public_key().public_bytes_raw())


def _print_report(server: str, slug: str, checks: list[Check], verdict: Verdict) -> None:
    typer.echo(f"Checking run {slug} on {server}")
    for number, check in enumerate(checks, start=1):
        typer.echo(f"{check.status.mark} {number}. {check.title}: {check.summary}")
        if check.advice:
            typer.echo(f"     → {check.advice}")
    typer.echo(f"{'✓' if verdict.can_take_part else '✗'} This computer {verdict.summary}.")
