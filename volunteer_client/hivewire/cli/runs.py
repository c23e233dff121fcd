"""`hivewire runs`: the runs this account may see and join."""

from __future__ import annotations

import typer

from hivewire._text import printable
from hivewire.cli._common import ServerOption, open_api, resolve


def command(
    ctx: typer.Context,
    server: ServerOption = None,
) -> None:
    """List the runs you can see, with their recipe, strategy and the command that joins each."""
    config = resolve(ctx, server=server)
    with open_api(ctx, config) as api:
        runs = api.runs()
    if not runs.data:
        typer.echo(f"No runs on {config.server} that you can see.")
        return
    width = max(len(run.slug) for run in runs.data)
    for run in runs.data:
        recipe = f"{run.recipe} {printable(run.recipe_version, 32)}"
        typer.echo(f"{run.slug:<{width}}  {recipe:<24}  {run.strategy:<7}  {printable(run.name, 100)}")
        if run.status == "closed":
            typer.echo(f"{'':<{width}}  closed: its organizer takes no new volunteers")
        else:
            typer.echo(f"{'':<{width}}  join: hivewire join {config.server}/runs/{run.slug}")
