"""The butterfly over real aiortc Links: three members, three link pairs, all on 127.0.0.1.

Host candidates are restricted to loopback for this module, and every SDP is checked to carry only
127.0.0.1 candidates before the other side sees it: nothing leaves the machine.
"""

import asyncio
import re
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import pytest
import torch
from aiortc import RTCPeerConnection, RTCSessionDescription

from hivewire.averaging import (
    BlockwiseInt8Compression,
    ButterflySettings,
    Cause,
    Codec,
    LinkGroupTransport,
    NoCompression,
    PeerUnreachable,
    RoundReport,
    butterfly_allreduce,
)
from hivewire.averaging.messages import KIND_RESULT
from hivewire.averaging.transport import GroupTransport
from hivewire.mesh import Link, build_configuration, restrict_host_addresses
from tests.client.averaging._support import tensors, weighted_mean

LOOPBACK = "127.0.0.1"
MEMBERS = ("a", "b", "c")
WEIGHTS = {"a": 3.0, "b": 1.0, "c": 2.0}
_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ", re.MULTILINE)


@pytest.fixture(autouse=True, scope="module")
def _loopback_only() -> Iterator[None]:
    restrict_host_addresses([LOOPBACK])
    yield
    restrict_host_addresses(None)


def _loopback_sdp(description: RTCSessionDescription | None) -> RTCSessionDescription:
    assert description is not None
    assert set(_CANDIDATE.findall(description.sdp)) == {LOOPBACK}, "non-loopback candidate in SDP"
    return description


async def _link_pair(offerer: str, answerer: str) -> tuple[Link, Link]:
    """An open pair of Links: the offerer's to the answerer, and the answerer's back."""
    pc_offer, pc_answer = RTCPeerConnection(build_configuration([])), RTCPeerConnection(build_configuration([]))
    there, back = Link(pc_offer, peer=answerer), Link(pc_answer, peer=offerer)
    await pc_offer.setLocalDescription(await pc_offer.createOffer())
    await pc_answer.setRemoteDescription(_loopback_sdp(pc_offer.localDescription))
    await pc_answer.setLocalDescription(await pc_answer.createAnswer())
    await pc_offer.setRemoteDescription(_loopback_sdp(pc_answer.localDescription))
    await asyncio.gather(there.wait_open(), back.wait_open())
    return there, back


@pytest.fixture
async def mesh() -> AsyncIterator[dict[str, dict[str, Link]]]:
    """``mesh[x][y]`` is x's open Link to y, for every pair of the three members."""
    links: dict[str, dict[str, Link]] = {member: {} for member in MEMBERS}
    for i, offerer in enumerate(MEMBERS):
        for answerer in MEMBERS[i + 1 :]:
            links[offerer][answerer], links[answerer][offerer] = await _link_pair(offerer, answerer)
    yield links
    for peers in links.values():
        for link in peers.values():
            await link.close()


async def _round(
    mesh: dict[str, dict[str, Link]], values: dict[str, torch.Tensor], members: tuple[str, ...], codec: Codec
) -> dict[str, tuple[torch.Tensor, RoundReport]]:
    settings = ButterflySettings(reduce_timeout_s=10.0, gather_timeout_s=10.0)
    rounds = [
        butterfly_allreduce(
            values[member],
            me=member,
            throughputs={"a": 2.0, "b": 1.0, "c": 1.0},
            weight=WEIGHTS[member],
            round_id="link-round",
            transport=LinkGroupTransport(mesh[member]),
            codec=codec,
            settings=settings,
        )
        for member in members
    ]
    return dict(zip(members, await asyncio.gather(*rounds), strict=True))


async def test_three_members_over_links_get_the_exact_weighted_mean(mesh: dict[str, dict[str, Link]]) -> None:
    values = tensors(MEMBERS, 150_001)  # parts of 150 to 300 kB: more than one 256 kB frame for a
    results = await _round(mesh, values, MEMBERS, NoCompression())
    expected = weighted_mean(values, WEIGHTS)
    for result, report in results.values():
        assert torch.equal(result, expected)
        assert report.excluded == {}
    compressed = await _round(mesh, values, MEMBERS, BlockwiseInt8Compression())  # the same links, a second round
    assert torch.equal(compressed["a"][0], compressed["c"][0])
    assert (compressed["a"][0] - expected).abs().max() < 0.1


async def test_member_whose_links_close_is_excluded_and_the_others_finish(mesh: dict[str, dict[str, Link]]) -> None:
    values = tensors(MEMBERS, 30_000)
    await asyncio.gather(*(link.close() for link in mesh["c"].values()))
    results = await _round(mesh, values, ("a", "b"), NoCompression())
    survivors = weighted_mean({member: values[member] for member in ("a", "b")}, WEIGHTS)
    for member, (result, report) in results.items():
        assert report.excluded["c"].cause == Cause.CONNECTION_LOST
        assert report.kept_local == ("c",)
        assert torch.equal(result[:15_000], survivors[:15_000])  # a's shard (throughput 2 of 4)
        assert torch.equal(result[22_500:], values[member][22_500:])  # c's shard, kept local


async def test_unknown_member_is_unreachable(mesh: dict[str, dict[str, Link]]) -> None:
    with pytest.raises(PeerUnreachable, match="no link to group member z"):
        await LinkGroupTransport(mesh["a"]).send("z", b"x")


async def test_member_killed_mid_round_over_links(mesh: dict[str, dict[str, Link]]) -> None:
    """c sends its parts, then its links close as it starts sending results: a and b finish without it."""
    values = tensors(MEMBERS, 30_000)
    throughputs = {"a": 2.0, "b": 1.0, "c": 1.0}
    settings = ButterflySettings(reduce_timeout_s=10.0, gather_timeout_s=10.0)

    class DiesBeforeResults(LinkGroupTransport):
        async def send(self, peer: str, data: bytes | bytearray) -> None:
            if data[5] == KIND_RESULT:
                await asyncio.gather(*(link.close() for link in mesh["c"].values()))
            await super().send(peer, data)

    def average(member: str, transport: GroupTransport) -> Coroutine[Any, Any, tuple[torch.Tensor, RoundReport]]:
        return butterfly_allreduce(
            values[member],
            me=member,
            throughputs=throughputs,
            weight=WEIGHTS[member],
            round_id="killed",
            transport=transport,
            codec=NoCompression(),
            settings=settings,
        )

    results = await asyncio.gather(
        average("a", LinkGroupTransport(mesh["a"])),
        average("b", LinkGroupTransport(mesh["b"])),
        average("c", DiesBeforeResults(mesh["c"])),
    )
    everyone = weighted_mean(values, WEIGHTS)
    for member, (result, report) in zip(("a", "b"), results[:2], strict=True):
        assert report.excluded["c"].cause == Cause.CONNECTION_LOST
        assert report.kept_local == ("c",)
        assert report.duration_s < settings.reduce_timeout_s
        assert torch.equal(result[:22_500], everyone[:22_500])  # a's and b's shards, c's parts included
        assert torch.equal(result[22_500:], values[member][22_500:])


async def test_messages_striped_over_several_links_arrive_in_order_and_give_the_same_bits() -> None:
    """Two members, three Links between them: message i goes over Link i mod 3 and is read from it."""
    pairs = [await _link_pair("a", "b") for _ in range(3)]
    stripes = {"a": {"b": [there for there, _ in pairs]}, "b": {"a": [back for _, back in pairs]}}
    values = tensors(("a", "b"), 600_000)
    settings = ButterflySettings(reduce_timeout_s=20.0, gather_timeout_s=20.0, min_chunk_elements=2**14)
    try:
        rounds = [
            butterfly_allreduce(
                values[member],
                me=member,
                throughputs={"a": 1.0, "b": 1.0},
                weight=WEIGHTS[member],
                round_id="striped",
                transport=LinkGroupTransport(stripes[member]),
                codec=NoCompression(),
                settings=settings,
            )
            for member in ("a", "b")
        ]
        results = await asyncio.gather(*rounds)
        for result, report in results:
            assert torch.equal(result, weighted_mean(values, WEIGHTS))
            assert report.excluded == {}
        sent = [there.stats.payloads_sent for there, _ in pairs]
        assert sent == [11, 11, 10]  # 16 PART chunks, then 16 RESULT chunks, dealt round-robin
    finally:
        await asyncio.gather(*(link.close() for pair in pairs for link in pair))
    with pytest.raises(ValueError, match="at least one link"):
        LinkGroupTransport({"b": []})
