"""`hivewire whoami`: which account the stored token belongs to, as the server sees it."""

from __future__ import annotations

import typer

from hivewire._text import printable
from hivewire.cli._common import ServerOption, open_api, resolve


def command(
    ctx: typer.Context,
    server: ServerOption = None,
) -> None:
    """Show the account the stored API token belongs to, as the server sees it."""
    config = resolve(ctx, server=server)
    with open_api(ctx, config, signed_in=True) as api:
        me = api.me()
    name = printable(me.display_name or "")
    email = printable(me.email or "no email")
    role = ", organizer" if me.is_organizer else ""
    typer.echo(f"{name} <{email}> (user {me.id}{role}) on {config.server}".lstrip())
