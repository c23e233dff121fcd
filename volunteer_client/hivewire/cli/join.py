"""`hivewire join RUN_URL`: get a verified peer certificate for this machine's key in a run.

For now it stops after the certificate and prints what the mesh will start from; later it trains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import httpx
import typer

from hivewire._text import printable
from hivewire.api import SLUG_PATTERN, HivewireAPI, JoinResponse
from hivewire.cli._common import open_api, resolve
from hivewire.errors import CertificateError, InvalidRunURL
from hivewire.identity import CertificateVerifier, PeerCertificate, PeerIdentity, load_or_create_identity

_RUN_PATH = re.compile(rf"^(?P<prefix>.*)/runs/(?P<slug>{SLUG_PATTERN})/?$")


def parse_run_url(url: str) -> tuple[str, str]:
    """`https://host[:port][/prefix]/runs/<slug>` → (server URL, slug)."""
    try:
        parsed = httpx.URL(url.strip())
    except httpx.InvalidURL as exc:
        raise InvalidRunURL(f"{url!r} is not a URL: {exc}") from exc
    match = _RUN_PATH.match(parsed.path)
    if parsed.scheme not in ("http", "https") or not parsed.host or match is None:
        raise InvalidRunURL(f"{url!r} is not a run URL")
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}{match['prefix']}", match["slug"]


@dataclass(frozen=True)
class JoinedRun:
    """This machine's identity in a run: the join answer and its certificate, verified against each other."""

    identity: PeerIdentity
    joined: JoinResponse
    certificate: PeerCertificate


def join_run(api: HivewireAPI, key_path: Path, slug: str) -> JoinedRun:
    """Join `slug` with the peer key at `key_path` (created on first use) and verify the certificate.

    Shared by `join` and `doctor`, so both refuse the same bad answers.
    """
    identity = load_or_create_identity(key_path)
    joined = api.join(slug, identity.peer_key)
    verifier = CertificateVerifier(api.server_url, http=api.http)
    certificate = verifier.verify(joined.certificate, run=slug)
    # The certificate must be for this machine's key, or peers would refuse every connection we make.
    if certificate.peer_key != identity.public_key_raw or joined.peer_id != identity.peer_id:
        raise CertificateError("the server certified another peer key than this machine's")
    if joined.run.slug != slug:
        raise CertificateError(f"the server answered for run {joined.run.slug!r}, not {slug!r}")
    return JoinedRun(identity, joined, certificate)


def command(
    ctx: typer.Context,
    run_url: Annotated[str, typer.Argument(help="The run's URL, as shown on its page: https://host/runs/<name>")],
) -> None:
    """Join a run: prove this machine's peer key to the server and receive a certificate for it."""
    server, slug = parse_run_url(run_url)
    config = resolve(ctx, server=server)
    with open_api(ctx, config, signed_in=True) as api:
        member = join_run(api, config.key_path, slug)
    identity, joined, certificate = member.identity, member.joined, member.certificate

    minutes = int((certificate.expires_at - datetime.now(UTC)).total_seconds() // 60)
    kinds = sorted({kind for ice in joined.ice_servers for kind in ice.kinds}) or ["none"]
    peers = joined.initial_peers
    typer.echo(f"Joined run {printable(joined.run.name, 100)} ({slug}) on {config.server}")
    typer.echo(f"  peer id      {identity.peer_id}")
    typer.echo(f"  certificate  valid until {certificate.expires_at:%Y-%m-%d %H:%M:%S} UTC ({minutes} min)")
    typer.echo(f"  recipe       {joined.run.recipe} {printable(joined.run.recipe_version, 32)}, {joined.run.strategy}")
    typer.echo(f"  ICE servers  {', '.join(kinds)}")
    typer.echo(f"  peers        {len(peers)} to contact first{': ' if peers else ''}{', '.join(peers[:5])}")
