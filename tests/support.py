"""Small helpers every kind of test uses: a free loopback port and bounded waits that say what did not happen."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

LOOPBACK = "127.0.0.1"
# Every wait in the tests is bounded by this; on loopback each step takes well under a second.
WAIT_S = 10.0
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


async def within(awaitable: Awaitable[T], what: str, seconds: float = WAIT_S) -> T:
    """Await with a bound, failing with a sentence that says what did not happen."""
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError:
        raise AssertionError(f"{what} did not happen within {seconds} s") from None


async def eventually(condition: Callable[[], bool], what: str, seconds: float = WAIT_S) -> None:
    """Poll ``condition`` until it holds, with a bound."""

    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 (state owned by code under test, no event to wait on)
            await asyncio.sleep(0.01)

    await within(poll(), what, seconds)
