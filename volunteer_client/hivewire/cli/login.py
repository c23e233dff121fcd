"""`hivewire login URL`: sign in with the device flow (RFC 8628), or store a token made on the web."""

from __future__ import annotations

import sys
import webbrowser
from typing import Annotated

import httpx
import typer

from hivewire._text import printable
from hivewire.cli._common import open_api, resolve, state
from hivewire.config import CredentialStore, validate_token
from hivewire.login import wait_for_token

_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def command(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="The server's URL, e.g. https://hivewire.example.org")],
    headless: Annotated[bool, typer.Option("--headless", help="Do not open a browser; print the URL only")] = False,
    token: Annotated[
        str | None,
        typer.Option(help="Store this API token (made on the server's Tokens page) instead; '-' reads it from stdin"),
    ] = None,
) -> None:
    """Sign in to a Hivewire server and remember the API token (file mode 0600).

    Prints a short code and opens the page where you approve it (--headless: open the URL on any device).

    --token stores a token made on the server's Tokens page instead.

    Example: hivewire login https://hive.example.org
    """
    if token == "-":
        token = sys.stdin.readline(200)
    config = resolve(ctx, server=url, token=validate_token(token) if token is not None else None)
    assert config.server is not None  # resolve() was given one
    if httpx.URL(config.server).scheme == "http" and httpx.URL(config.server).host not in _LOOPBACK:
        typer.echo(f"Warning: {config.server} is not https; your token crosses the network unencrypted.", err=True)
    with open_api(ctx, config) as api:
        if token is None:
            code = api.device_code()
            link = code.verification_uri_complete or code.verification_uri
            typer.echo(f"Open {printable(code.verification_uri)} and enter the code {code.user_code}")
            if not headless:
                webbrowser.open(link)
            typer.echo("Waiting for approval in the browser (Ctrl-C to cancel)…")
            token = wait_for_token(api, code, sleep=state(ctx).sleep)
    with open_api(ctx, resolve(ctx, server=config.server, token=token), signed_in=True) as api:
        me = api.me()
    CredentialStore(config.credentials_path).store(config.server, token)
    who = printable(me.email or me.display_name or f"user {me.id}")
    typer.echo(f"Signed in to {config.server} as {who}.")
