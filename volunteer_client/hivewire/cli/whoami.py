"""`hivewire whoami`: which account the stored token belongs to, as the server sees it."""

from __future__ import annotations

from typing import Annotated

import typer

from hivewire._text import printable
from hivewire.cli._common import open_api, resolve


def command(
    ctx: typer.Context,
    server: Annotated[str | None, typer.Option(help="Server URL [default: $HIVEWIRE_SERVER or the last login]")] = None,
) -> None:
    """Show the signed-in account."""
    config = resolve(ctx, server=server)
    with open_api(ctx, config, signed_in=True) as api:
        me = api.me()
    name = printable(me.display_name or "")
    email = printable(me.email or "no email")
    role = ", organizer" if me.is_organizer else ""
    typer.echo(f"{name} <{email}> (user {me.id}{role}) on {config.server}".lstrip())
