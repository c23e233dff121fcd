"""`hivewire logout`: forget the API token of a server on this machine."""

from __future__ import annotations

import typer

from hivewire.cli._common import ServerOption, resolve
from hivewire.config import CredentialStore
from hivewire.errors import NotSignedIn


def command(
    ctx: typer.Context,
    server: ServerOption = None,
) -> None:
    """Forget the API token this computer stored for a server.

    The token stays valid on the server: revoke it on its Tokens page to disable it everywhere.
    """
    config = resolve(ctx, server=server)
    if config.server is None:
        raise NotSignedIn("not signed in to any server")
    if CredentialStore(config.credentials_path).forget(config.server):
        typer.echo(f"Signed out of {config.server}.")
    else:
        typer.echo(f"Not signed in to {config.server}; nothing to do.")
