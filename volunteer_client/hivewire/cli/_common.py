"""What every command shares: the state set by global options, config resolution, the API client."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import httpx
import typer

from hivewire.api import HivewireAPI
from hivewire.config import ClientConfig, load_config
from hivewire.errors import HivewireError, NotSignedIn

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class CliState:
    """Set by the global options; tests pass one with a `transport` (an in-process server) and a `sleep`."""

    # --home, or None to use $HIVEWIRE_HOME or the default.
    home: Path | None = None
    # HTTP transport under every client the commands create; None for real network connections.
    transport: httpx.BaseTransport | None = None
    # How commands wait between polls (seconds); tests pass one that returns at once.
    sleep: Callable[[float], None] = time.sleep


def state(ctx: typer.Context) -> CliState:
    if not isinstance(ctx.obj, CliState):
        ctx.obj = CliState()
    return ctx.obj


def resolve(ctx: typer.Context, *, server: str | None = None, token: str | None = None) -> ClientConfig:
    """The config of this command: its flags over the environment over the config file."""
    return load_config(server=server, token=token, home=state(ctx).home)


def open_api(ctx: typer.Context, config: ClientConfig, *, signed_in: bool = False) -> HivewireAPI:
    """A client for the configured server; with `signed_in`, refuses early when there is no token."""
    if config.server is None:
        raise NotSignedIn("no server is configured")
    if signed_in and config.token is None:
        raise NotSignedIn(f"not signed in to {config.server}")
    return HivewireAPI(config.server, config.token, transport=state(ctx).transport, timeout_s=config.timeout_s)


def friendly_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn a `HivewireError` into its message and advice on stderr and exit status 1, without traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except HivewireError as exc:
            logging.getLogger("hivewire.cli").debug("command failed", exc_info=True)
            typer.echo(f"Error: {exc}", err=True)
            typer.echo(exc.advice, err=True)
            raise typer.Exit(1) from None

    return wrapper
