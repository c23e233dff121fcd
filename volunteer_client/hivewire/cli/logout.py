"""`hivewire logout`: forget the API token of a server on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from hivewire.cli._common import resolve
from hivewire.config import CredentialStore
from hivewire.errors import NotSignedIn


def command(
    ctx: typer.Context,
    server: Annotated[str | None, typer.Option(help="Server URL [default: $HIVEWIRE_SERVER or the last login]")] = None,
) -> None:
    """Remove the stored API token (revoke it on the server's Tokens page to disable it everywhere)."""
    config = resolve(ctx, server=server)
    if config.server is None:
        raise NotSignedIn("not signed in to any server")
    if CredentialStore(config.credentials_path).forget(config.server):
        typer.echo(f"Signed out of {config.server}.")
    else:
        typer.echo(f"Not signed in to {config.server}; nothing to do.")
