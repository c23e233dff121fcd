"""`hivewire join RUN_URL`: join a run, start the network process, train until done, leave cleanly.

The join gives a verified certificate for this machine's key and the run spec; the recipe the spec names
must be installed (the server never ships code). Networking runs in its own process (session/network.py)
and this process trains (session/trainer.py), renews the certificate before it expires (session/renewal.py)
and sends signed progress reports and co-signed round receipts to the server (reporter.py). Ctrl-C abandons
the round in flight, closes the mesh and exits 130; reaching --max-steps/--max-epochs exits 0. Either way the
reports are flushed for at most REPORT_FLUSH_TIMEOUT_S; what the server did not take waits on disk and goes
with the next join of this run.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import httpx
import torch
import typer

from hivewire._text import printable
from hivewire.api import SLUG_PATTERN, HivewireAPI, JoinResponse
from hivewire.cli._common import open_api, resolve, state
from hivewire.config import private_dir
from hivewire.errors import CertificateError, ConfigError, InvalidRunURL
from hivewire.identity import CertificateVerifier, PeerCertificate, PeerIdentity, load_or_create_identity
from hivewire.optim import DilocoConfig
from hivewire.recipes import resolve as resolve_recipe
from hivewire.reporter import Reporter, ReporterConfig
from hivewire.session.handle import NetworkHandle
from hivewire.session.messages import NetworkConfig
from hivewire.session.renewal import CertificateRenewer
from hivewire.session.trainer import TrainConfig, train

REPORT_FLUSH_TIMEOUT_S = 10.0  # on leave, for the last reports and receipts; the rest waits on disk
REPORT_REQUEST_TIMEOUT_S = 5.0
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
    device: Annotated[str, typer.Option(help="Torch device to train on: cpu, cuda, cuda:1, mps")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per micro-batch on this machine")] = 16,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Leave after this many local micro-batches")] = None,
    max_epochs: Annotated[int | None, typer.Option(min=1, help="Leave once the run reaches this epoch")] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Write the final model there as a torch state dict (model.pt)")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data directory for custom recipes, exported as HIVEWIRE_DATA_DIR (built-ins ship theirs)"),
    ] = None,
    inner_steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="diloco runs: local steps between two averaging rounds; the run decides, this only checks it",
        ),
    ] = None,
    ice_address: Annotated[
        list[str] | None,
        typer.Option(help="Offer only these local addresses to peers (repeatable) (default: every address)"),
    ] = None,
    no_direct: Annotated[
        bool, typer.Option("--no-direct", help="Send averaging payloads over WebRTC only, never a direct TLS link")
    ] = False,
    untuned: Annotated[
        bool, typer.Option("--untuned", help="Use aiortc's SCTP as shipped, not the tuned one (troubleshooting)")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Join and verify the certificate, print the summary, do not train")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the mesh and rounds do")] = False,
) -> None:
    """Join a run and train with its volunteers until --max-steps/--max-epochs or Ctrl-C."""
    server, slug = parse_run_url(run_url)
    config = resolve(ctx, server=server)
    with open_api(ctx, config, signed_in=True) as api:
        member = join_run(api, config.key_path, slug)
    identity, joined, certificate = member.identity, member.joined, member.certificate
    spec = joined.run
    recipe = resolve_recipe(spec.recipe, spec.recipe_version)  # the server never ships code: refuse what we lack
    # diloco's H and overlap are the run's: a volunteer that chose others would never line up with its rounds
    run_inner_steps: int = getattr(spec, "inner_steps", DilocoConfig.inner_steps)
    run_overlap: bool = getattr(spec, "overlap", True)
    if inner_steps is not None and inner_steps != run_inner_steps and spec.strategy == "diloco":
        raise ConfigError(
            f"--inner-steps {inner_steps} differs from the run's {run_inner_steps}; "
            "leave it out to use the run's (every volunteer must use the same)"
        )
    if data_dir is not None:
        if not data_dir.is_dir():
            raise ConfigError(f"--data-dir {data_dir} is not a directory")
        os.environ["HIVEWIRE_DATA_DIR"] = str(data_dir.resolve())  # the recipe protocol has no data argument
    if verbose:
        logging.getLogger("hivewire").setLevel(logging.INFO)

    minutes = int((certificate.expires_at - datetime.now(UTC)).total_seconds() // 60)
    kinds = sorted({kind for ice in joined.ice_servers for kind in ice.kinds}) or ["none"]
    peers = joined.initial_peers
    typer.echo(f"Joined run {printable(spec.name, 100)} ({slug}) on {config.server}")
    typer.echo(f"  peer id      {identity.peer_id}")
    typer.echo(f"  certificate  valid until {certificate.expires_at:%Y-%m-%d %H:%M:%S} UTC ({minutes} min)")
    diloco = (
        f" (H={run_inner_steps}, {'overlapped' if run_overlap else 'blocking'})" if spec.strategy == "diloco" else ""
    )
    typer.echo(f"  recipe       {spec.recipe} {printable(spec.recipe_version, 32)}, {spec.strategy}{diloco}")
    typer.echo(f"  ICE servers  {', '.join(kinds)}")
    typer.echo(f"  peers        {len(peers)} to contact first{': ' if peers else ''}{', '.join(peers[:5])}")
    if dry_run:
        return
    network = NetworkConfig(
        server=api.server_url,
        run=slug,
        key_path=config.key_path,
        certificate=joined.certificate,
        signaling_url=joined.signaling_url,
        ice_servers=[ice.model_dump(exclude_none=True) for ice in joined.ice_servers],
        initial_peers=list(joined.initial_peers),
        target_batch_size=spec.target_batch_size,
        group_size=spec.group_size,
        compression=spec.compression,
        host_addresses=tuple(ice_address) if ice_address else None,
        sctp_tuning=not untuned,
        direct_path=not no_direct,
        log_level=logging.INFO if verbose else logging.WARNING,
    )
    options = TrainConfig(
        batch_size=batch_size,
        device=torch.device(device),
        max_steps=max_steps,
        max_epochs=max_epochs,
        checkpoint_dir=checkpoint_dir,
        inner_steps=run_inner_steps,
        overlap=run_overlap,
    )
    numel = sum(p.numel() for p in recipe.build_model(0).parameters() if p.requires_grad)
    handle = NetworkHandle(network, numel)
    renewal_api = open_api(ctx, config, signed_in=True)
    renewer = CertificateRenewer(
        renewal_api,
        run=slug,
        identity=identity,
        verifier=CertificateVerifier(renewal_api.server_url, http=renewal_api.http),
        current=certificate,
        on_renewed=handle.renewed,
    )
    queue_dir = private_dir(config.home / "reports")  # receipts carry the members' certificates
    reporter = Reporter(
        renewal_api.server_url,
        slug,
        identity,
        renewer.certificate,
        ReporterConfig(queue_path=queue_dir / f"{slug}.jsonl", request_timeout_s=REPORT_REQUEST_TIMEOUT_S),
        device_kind=torch.device(device).type,
        transport=state(ctx).transport,
    )
    renewer.start()
    reporter.start()
    try:
        result = train(recipe, spec.strategy, slug, identity.peer_id, handle, options, reporter)
    finally:
        # Leaving is bounded (LEAVE_TIMEOUT_S, then REPORT_FLUSH_TIMEOUT_S); a Ctrl-C now (a second one, or
        # one that comes as --max-epochs is reached) would only cut the last receipts and reports short.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            handle.leave()
            while handle.receipts:  # the last rounds', co-signed while the network process left
                reporter.receipt(handle.receipts.popleft().body)
            flushed = reporter.close(REPORT_FLUSH_TIMEOUT_S)
            renewer.close()
        finally:
            signal.signal(signal.SIGINT, previous)
    waiting = flushed.pending + flushed.receipts_pending
    typer.echo(
        f"Reports: {reporter.reports_delivered} progress reports and {reporter.receipts_delivered} round receipts "
        "delivered" + (f", {waiting} waiting for the server (sent on the next join)" if waiting else "")
    )
    losses = f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}" if result.losses else "no epoch completed"
    typer.echo(
        f"Left run {slug} at epoch {result.epoch} after {result.steps} steps ({losses}); "
        f"{result.rounds} averaging rounds with other volunteers ({result.samples_averaged} samples) sent "
        f"{result.bytes_sent} bytes. Goodbye."
    )
    if result.checkpoint is not None:
        typer.echo(f"Final model written to {result.checkpoint}")
    if result.interrupted:
        raise typer.Exit(130)
