"""Helpers shared by the signaling tests: bounded waits, peers with certificates, loopback-only SDP checks."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiortc import RTCConfiguration, RTCPeerConnection

from hivewire.identity import PeerIdentity

LOOPBACK = "127.0.0.1"
# Every wait in these tests is bounded by this; on loopback each step takes well under a second.
WAIT_S = 10.0
_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ", re.MULTILINE)
T = TypeVar("T")


def assert_loopback_only(sdp: str) -> str:
    """Return `sdp` after checking that every candidate in it is on loopback."""
    addresses = set(_CANDIDATE.findall(sdp))
    assert addresses <= {LOOPBACK}, f"non-loopback candidates in SDP: {addresses}"
    return sdp


async def within(awaitable: Awaitable[T], what: str, seconds: float = WAIT_S) -> T:
    """Await with a bound, failing with a sentence that says what did not happen."""
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError:
        raise AssertionError(f"{what} did not happen within {seconds} s") from None


async def eventually(condition: Callable[[], bool], what: str, seconds: float = WAIT_S) -> None:
    """Poll `condition` until it holds, with a bound."""

    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 (state owned by code under test, no event to wait on)
            await asyncio.sleep(0.02)

    await within(poll(), what, seconds)


@dataclass
class Member:
    """A volunteer of the run: its peer key and a certificate signed for it."""

    identity: PeerIdentity
    certificate: str

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


def new_pc() -> RTCPeerConnection:
    """A peer connection that asks no STUN server (aiortc's default would be a public one)."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))
