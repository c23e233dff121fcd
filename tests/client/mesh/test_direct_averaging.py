"""Averaging is bit-identical whichever path carried it: a three-member butterfly round over links whose bulk
payloads take the direct TLS path gives exactly the round over WebRTC links, and so does a round during which
one direct stream is killed (its payloads go again over WebRTC)."""

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import torch

from hivewire.averaging import ButterflySettings, LinkGroupTransport, NoCompression, butterfly_allreduce
from hivewire.mesh import ControlCodec, DirectEndpoint, DirectSettings, Link, LinkSettings
from hivewire.mesh.direct import PATH_DIRECT
from tests.client.averaging._support import tensors

from .conftest import LOOPBACK, negotiate, new_pc

MEMBERS = ("a", "b", "c")
WEIGHTS = {"a": 3.0, "b": 1.0, "c": 2.0}
THROUGHPUTS = {"a": 2.0, "b": 1.0, "c": 1.0}
NUMEL = 400_001  # parts of 0.4 to 0.8 MB: several frames each
DEADLINE_S = 30.0

Mesh = dict[str, dict[str, Link]]


@pytest.fixture
async def meshes() -> AsyncIterator[Callable[[bool], object]]:
    """Factory: ``mesh[x][y]`` is x's open Link to y; with ``direct`` each member listens on loopback."""
    links: list[Link] = []
    endpoints: list[DirectEndpoint] = []

    async def make(direct: bool) -> Mesh:
        own: dict[str, DirectEndpoint | None] = {member: None for member in MEMBERS}
        if direct:
            for member in MEMBERS:
                own[member] = endpoint = DirectEndpoint(DirectSettings(listen_addresses=(LOOPBACK,)))
                endpoints.append(endpoint)
                await endpoint.start()
        mesh: Mesh = {member: {} for member in MEMBERS}
        for i, x in enumerate(MEMBERS):
            for y in MEMBERS[i + 1 :]:
                pc_x, pc_y = new_pc(), new_pc()
                settings = LinkSettings(open_timeout_s=10)
                mesh[x][y] = Link(pc_x, peer=y, settings=settings, codec=ControlCodec(), direct=own[x])
                mesh[y][x] = Link(pc_y, peer=x, settings=settings, codec=ControlCodec(), direct=own[y])
                links.extend((mesh[x][y], mesh[y][x]))
                await negotiate(pc_x, pc_y)
        await asyncio.gather(*(link.wait_open() for peers in mesh.values() for link in peers.values()))
        if direct:
            async with asyncio.timeout(DEADLINE_S):
                while not all(link.path == PATH_DIRECT for peers in mesh.values() for link in peers.values()):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        return mesh

    yield make
    for link in links:
        await link.close()
    for endpoint in endpoints:
        await endpoint.close()


async def average(mesh: Mesh, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    settings = ButterflySettings(reduce_timeout_s=DEADLINE_S, gather_timeout_s=DEADLINE_S)
    rounds = [
        butterfly_allreduce(
            values[member],
            me=member,
            throughputs=THROUGHPUTS,
            weight=WEIGHTS[member],
            round_id="paths",
            transport=LinkGroupTransport(mesh[member]),
            codec=NoCompression(),
            settings=settings,
        )
        for member in MEMBERS
    ]
    results = await asyncio.gather(*rounds)
    for _, report in results:
        assert report.excluded == {}
    return {member: result for member, (result, _) in zip(MEMBERS, results, strict=True)}


@pytest.mark.slow
async def test_averaging_is_bit_identical_over_direct_and_webrtc_links(meshes) -> None:
    values = tensors(MEMBERS, NUMEL)
    over_webrtc = await average(await meshes(False), values)
    direct = await meshes(True)
    over_direct = await average(direct, values)
    for member in MEMBERS:
        assert torch.equal(over_direct[member], over_webrtc[member])
    assert all(link.stats.payloads_sent_direct >= 1 for peers in direct.values() for link in peers.values())

    killed = direct["a"]["c"].direct_stream
    assert killed is not None
    values = tensors(MEMBERS, NUMEL, seed=1)
    reference = await average(await meshes(False), values)
    killing = asyncio.create_task(average(direct, values))
    async with asyncio.timeout(DEADLINE_S):
        while killed.frames_received == 0 and not killing.done():  # noqa: ASYNC110 - no event for it
            await asyncio.sleep(0.001)
    killed.abort("killed by the test during the round")
    during_a_drop = await killing
    for member in MEMBERS:
        assert torch.equal(during_a_drop[member], reference[member])
    between = (direct["a"]["c"].stats, direct["c"]["a"].stats)
    assert sum(stats.payloads_sent - stats.payloads_sent_direct for stats in between) >= 1, "some went over WebRTC"
