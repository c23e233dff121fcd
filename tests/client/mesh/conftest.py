"""Real aiortc peer-connection pairs in one process, on 127.0.0.1 only, offer/answer passed directly.

No test here may send a packet anywhere but loopback: host candidates are restricted to 127.0.0.1 for
the whole session, and every SDP is checked to carry no other candidate address before the peer sees it.
"""

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from hivewire.mesh import (
    ControlCodec,
    Link,
    LinkSettings,
    RecordSchema,
    build_configuration,
    restrict_host_addresses,
)

LOOPBACK = "127.0.0.1"
_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ", re.MULTILINE)


@pytest.fixture(autouse=True, scope="session")
def _loopback_only() -> Iterator[None]:
    """Gather host candidates on 127.0.0.1 alone (aioice would otherwise use eth0 and skip loopback)."""
    restrict_host_addresses([LOOPBACK])
    yield
    restrict_host_addresses(None)


def loopback_sdp(description: RTCSessionDescription | None) -> RTCSessionDescription:
    """Return the description after checking that every candidate in it is on loopback."""
    assert description is not None
    addresses = set(_CANDIDATE.findall(description.sdp))
    assert addresses == {LOOPBACK}, f"non-loopback candidates in SDP: {addresses}"
    return description


async def negotiate(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    """Exchange offer and answer directly, as signaling would, refusing any non-loopback candidate."""
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(loopback_sdp(offerer.localDescription))
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(loopback_sdp(answerer.localDescription))


def new_pc() -> RTCPeerConnection:
    return RTCPeerConnection(build_configuration([]))


@pytest.fixture
async def link_pair() -> AsyncIterator[Callable[..., object]]:
    """Factory for an open pair of links (a offers, b answers); every link is closed at teardown."""
    links: list[Link] = []

    async def make(
        settings_a: LinkSettings | None = None,
        settings_b: LinkSettings | None = None,
        *,
        schemas: Sequence[RecordSchema] = (),
        on_dead: Callable[[Link, str], None] | None = None,
    ) -> tuple[Link, Link]:
        pc_a, pc_b = new_pc(), new_pc()
        a = Link(pc_a, peer="b", settings=settings_a, codec=ControlCodec(schemas), on_dead=on_dead)
        b = Link(pc_b, peer="a", settings=settings_b, codec=ControlCodec(schemas))
        links.extend((a, b))
        await negotiate(pc_a, pc_b)
        await asyncio.gather(a.wait_open(), b.wait_open())
        return a, b

    yield make
    for link in links:
        await link.close()
