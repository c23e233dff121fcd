"""What every command shares: the state set by global options, config resolution, the API client."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import httpx
import typer

from hivewire.api import HivewireAPI
from hivewire.config import ClientConfig, load_config
from hivewire.errors import NO_CUDA_BUILD_ADVICE, DeviceUnavailable, HivewireError, NotSignedIn

# `--server` of the commands that act on one server. Parentheses, not [brackets]: Typer reads those as markup.
ServerOption = Annotated[str | None, typer.Option(help="Server URL (default: $HIVEWIRE_SERVER, else the last login)")]

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


def check_device(spec: str) -> None:
    """Refuse a torch device this computer cannot train on, before the command joins or starts anything.

    Without this, `--device cuda` on a machine without a usable GPU fails deep in the trainer, after the join.
    """
    import torch  # only commands with a --device option get here; the others need not import it

    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise DeviceUnavailable(f"--device {spec!r} is not a torch device (cpu, cuda, cuda:1, mps): {exc}") from exc
    if device.type == "cpu":
        return
    if device.type == "meta":  # shapes without data: it would "train" on nothing
        raise DeviceUnavailable(f"--device {spec}: the meta device holds no data and cannot train")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"--device {spec}: PyTorch finds no Apple GPU (MPS) here")
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise DeviceUnavailable(
                f"--device {spec}: this PyTorch {torch.__version__} was built without CUDA",
                advice=NO_CUDA_BUILD_ADVICE,
            )
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"--device {spec}: PyTorch finds no usable NVIDIA GPU or driver here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise DeviceUnavailable(f"--device {spec}: this computer has {count} GPU(s), numbered from 0")
    try:
        torch.empty(1, device=device)  # the same first step training takes on it
    except (RuntimeError, AssertionError) as exc:  # torch raises AssertionError for backends it was built without
        first_sentence = str(exc).split(". ")[0].splitlines()[0][:200]  # torch's messages run to pages
        raise DeviceUnavailable(f"--device {spec}: {first_sentence}") from exc


def friendly_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn a `HivewireError` into its message and advice on stderr and exit status 1, without traceback.

    A command with a `device` option has it checked first (`check_device`), so no command starts work on a
    device that cannot train.
    """

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            device = kwargs.get("device")
            if isinstance(device, str):
                check_device(device)
            return command(*args, **kwargs)
        except HivewireError as exc:
            logging.getLogger("hivewire.cli").debug("command failed", exc_info=True)
            typer.echo(f"Error: {exc}", err=True)
            typer.echo(exc.advice, err=True)
            raise typer.Exit(1) from None

    return wrapper
