"""The `hivewire` command: one module per subcommand, registered here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from hivewire.cli import doctor, join, login, logout, runs, whoami
from hivewire.cli._common import CliState, friendly_errors, state

__all__ = ["CliState", "app", "main"]

app = typer.Typer(
    name="hivewire",
    help="Train one model together with other volunteers, peer to peer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global_options(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(
            help="Directory for config, credentials and peer key (default: $HIVEWIRE_HOME, else ~/.config/hivewire)"
        ),
    ] = None,
) -> None:
    state(ctx).home = home


for _module in (login, logout, whoami, runs, join, doctor):
    app.command(_module.__name__.rsplit(".", 1)[1])(friendly_errors(_module.command))


def main() -> None:
    """Console script entry point (`hivewire`)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    app()
