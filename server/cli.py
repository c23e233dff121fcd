"""`hivewire-server`: migrate, wait for the database, serve, and administrative commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from sqlalchemy import text

from hivewire_server import accounts
from hivewire_server.core import keys, migrate
from hivewire_server.core.config import Settings
from hivewire_server.core.db import create_engine, session_factory
from hivewire_server.errors import DomainError

log = logging.getLogger("hivewire.server")


async def _wait_for_db(database_url: str, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    engine = create_engine(database_url)
    try:
        while True:
            try:
                async with engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
                return
            except Exception as exc:  # any connection failure means "not yet"
                if time.monotonic() > deadline:
                    raise SystemExit(f"database not reachable after {timeout_seconds:.0f} s: {exc}") from exc
                log.info("waiting for the database: %s", exc)
                await asyncio.sleep(1)
    finally:
        await engine.dispose()


async def _with_session(settings: Settings, action: str, argument: str = "") -> str:
    engine = create_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session:
            if action == "make-organizer":
                user = await accounts.make_organizer(session, email=argument)
                return f"{user.email} is now an organizer"
            return (
                f"new signing key {await keys.rotate(session)}; old keys stay published until their certificates expire"
            )
    finally:
        await engine.dispose()


def _serve(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from hivewire_server.main import create_app

    log.info("serving on http://%s:%d (public URL %s)", host, port, settings.base_url)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level.lower(), access_log=False)


def _parser() -> argparse.ArgumentParser:
    """Every command and option with help; settings come from the environment (docs/operations.md)."""
    parser = argparse.ArgumentParser(
        prog="hivewire-server",
        description="The Hivewire coordinator server: database migrations, serving, and administration.",
        epilog="Settings (DATABASE_URL, PUBLIC_URL, secrets, ...) come from environment variables; "
        "docs/operations.md lists them all.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")

    command("migrate", "bring the database schema to the newest revision (alembic upgrade head)")
    wait = command("wait-for-db", "wait until the database answers, for container start-up")
    wait.add_argument("--timeout", type=float, default=60.0, help="seconds to wait before giving up (default: 60)")
    serve = command("serve", "migrate the database, then serve HTTP and the signaling WebSockets")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: 8000)")
    serve.add_argument("--no-migrate", action="store_true", help="skip migrations (another process ran them)")
    organizer = command("make-organizer", "give a user who has signed in once the organizer role")
    organizer.add_argument("email", help="the user's email address")
    command("rotate-keys", "start signing certificates with a new key; old keys stay published until they expire")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "migrate":
            migrate.upgrade(settings.database_url)
        elif args.command == "wait-for-db":
            asyncio.run(_wait_for_db(settings.database_url, args.timeout))
        elif args.command == "serve":
            if not args.no_migrate:
                migrate.upgrade(settings.database_url)
            _serve(settings, args.host, args.port)
        elif args.command == "make-organizer":
            print(asyncio.run(_with_session(settings, "make-organizer", args.email)))
        else:
            print(asyncio.run(_with_session(settings, "rotate-keys")))
    except DomainError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
