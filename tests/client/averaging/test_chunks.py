"""The butterfly's chunk pipeline: the same bits whatever the chunking, early chunks return before late ones
leave, and a member failing part-way counts for exactly the chunks it delivered."""

import asyncio

import pytest
import torch

from hivewire.averaging import (
    BlockwiseInt8Compression,
    ButterflySettings,
    Cause,
    InProcessHub,
    NoCompression,
)
from hivewire.averaging.butterfly import chunk_slices
from hivewire.averaging.messages import KIND_PART, KIND_RESULT, encode_message, parse_message, round_tag
from hivewire.averaging.partition import plan_chunks, plan_partition
from hivewire.averaging.transport import GroupTransport
from tests.client.averaging._support import ROUND, run_group, tensors, weighted_mean

MEMBERS = ("a", "b", "c")
WEIGHTS = {"a": 1.0, "b": 2.0, "c": 5.0}
NUMEL = 9_000  # 3,000 per shard
CHUNKED = ButterflySettings(
    reduce_timeout_s=30.0, gather_timeout_s=30.0, chunks_per_shard=4, min_chunk_elements=100, max_chunk_elements=10**6
)  # 4 chunks of 750 per shard
EVEN = dict.fromkeys(MEMBERS, 1.0)


def chunks_of(member: str, settings: ButterflySettings = CHUNKED) -> list[slice]:
    partition = plan_partition(NUMEL, EVEN)
    return chunk_slices(partition, partition.index(member), settings)


def part_chunk(reducer: str, values: torch.Tensor, chunk: int, *, weight: float, at: int | None = None) -> bytes:
    """PART chunk ``chunk`` for ``reducer`` as an honest member sends it; ``at`` falsifies its index."""
    partition = plan_partition(NUMEL, EVEN)
    return bytes(
        encode_message(
            KIND_PART,
            shard=partition.index(reducer),
            chunk=chunk if at is None else at,
            tag=round_tag(ROUND),
            weight=weight,
            contributors=0,
            codec=NoCompression(),
            values=values[chunks_of(reducer)[chunk]],
        )
    )


class _Recording:
    """A member's transport that records the kind and chunk of every message it receives."""

    def __init__(self, inner: GroupTransport) -> None:
        self.inner = inner
        self.received: list[tuple[str, int, int]] = []

    async def send(self, peer: str, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send(peer, data)

    async def recv(self, peer: str, *, timeout_s: float) -> bytes | bytearray | memoryview:
        data = await self.inner.recv(peer, timeout_s=timeout_s)
        message = parse_message(data, group_size=len(MEMBERS), max_weight=1e12)
        self.received.append((peer, message.kind, message.chunk))
        return data


def test_plan_chunks_cuts_shards_the_same_way_within_bounds() -> None:
    assert plan_chunks(3000, target_chunks=4, min_elements=100, max_elements=10**6) == (750,) * 4
    assert plan_chunks(3001, target_chunks=4, min_elements=100, max_elements=10**6) == (751, 751, 751, 748)
    assert plan_chunks(250, target_chunks=4, min_elements=100, max_elements=10**6) == (100, 100, 50)
    assert plan_chunks(50, target_chunks=4, min_elements=100, max_elements=10**6) == (50,)
    assert plan_chunks(10_000, target_chunks=2, min_elements=1, max_elements=3000) == (3000, 3000, 3000, 1000)
    assert plan_chunks(0, target_chunks=4, min_elements=1, max_elements=10) == ()
    for size in (1, 7, 4096, 65_537, 12_500_000):
        sizes = plan_chunks(size, target_chunks=8, min_elements=2**16, max_elements=2**20)
        assert sum(sizes) == size and all(0 < chunk <= 2**20 for chunk in sizes)
        assert len(sizes) <= max(8, -(-size // 2**20)) and all(chunk >= 2**16 for chunk in sizes[:-1])
    with pytest.raises(ValueError, match="min_elements <= max_elements"):
        plan_chunks(10, target_chunks=1, min_elements=5, max_elements=4)
    with pytest.raises(ValueError, match="chunks_per_shard"):
        ButterflySettings(chunks_per_shard=0)


@pytest.mark.parametrize("settings", [CHUNKED, ButterflySettings(min_chunk_elements=7, max_chunk_elements=7)])
async def test_chunked_round_gives_the_same_bits_as_one_message_per_shard(settings: ButterflySettings) -> None:
    values = tensors(MEMBERS, NUMEL)
    hub = InProcessHub(MEMBERS)
    recorders = {member: _Recording(hub.transport(member)) for member in MEMBERS}
    results = await run_group(values, WEIGHTS, settings=settings, hub=hub, transports=recorders)
    expected = weighted_mean(values, WEIGHTS)  # whole-tensor float64 arithmetic
    chunks = len(chunks_of("a", settings))
    assert chunks == (4 if settings is CHUNKED else 429)
    for member, (result, report) in results.items():
        assert torch.equal(result, expected), member
        assert report.excluded == {} and report.averaged_fraction == 1.0
        assert report.contributors == dict.fromkeys(MEMBERS, MEMBERS)
        kinds = [(kind, chunk) for peer, kind, chunk in recorders[member].received if peer == "b" or member == "b"]
        assert sum(kind == KIND_PART for kind, _ in kinds) == chunks * (2 if member == "b" else 1)
        assert sum(kind == KIND_RESULT for kind, _ in kinds) == chunks * (2 if member == "b" else 1)


async def test_compressed_chunked_round_gives_every_member_the_same_bits() -> None:
    values = tensors(MEMBERS, NUMEL)
    settings = ButterflySettings(chunks_per_shard=4, min_chunk_elements=100, max_chunk_elements=10**6)
    results = await run_group(values, WEIGHTS, codec=BlockwiseInt8Compression(block_size=64), settings=settings)
    first = results["a"][0]
    for result, report in results.values():
        assert torch.equal(result, first) and report.excluded == {}
    assert (first - weighted_mean(values, WEIGHTS)).abs().max() < 0.1


async def test_a_reducer_returns_early_chunks_before_the_last_part_reaches_it() -> None:
    """b holds back its last PART chunk to a until a RESULT of a's arrived: a round of two whole stages would
    wait for that chunk first and stall until the reduce deadline; the pipelined one completes at once."""
    values = tensors(MEMBERS, NUMEL)
    hub = InProcessHub(MEMBERS)
    last = len(chunks_of("a")) - 1
    result_from_a = asyncio.Event()

    class HoldsLastPart:
        async def send(self, peer: str, data: bytes | bytearray | memoryview) -> None:
            message = parse_message(data, group_size=3, max_weight=1e12)
            if peer == "a" and message.kind == KIND_PART and message.chunk == last:
                await result_from_a.wait()
            await hub.transport("b").send(peer, data)

        async def recv(self, peer: str, *, timeout_s: float) -> bytes | bytearray | memoryview:
            data = await hub.transport("b").recv(peer, timeout_s=timeout_s)
            if peer == "a" and parse_message(data, group_size=3, max_weight=1e12).kind == KIND_RESULT:
                result_from_a.set()
            return data

    settings = ButterflySettings(
        reduce_timeout_s=20.0, gather_timeout_s=20.0, chunks_per_shard=4, min_chunk_elements=100
    )
    results = await run_group(values, WEIGHTS, settings=settings, hub=hub, transports={"b": HoldsLastPart()})
    for result, report in results.values():
        assert torch.equal(result, weighted_mean(values, WEIGHTS))
        assert report.excluded == {}
        assert report.duration_s < settings.reduce_timeout_s  # never waited for the deadline


async def test_a_member_lost_part_way_counts_for_the_chunks_it_delivered() -> None:
    values = tensors(MEMBERS, NUMEL)
    hub = InProcessHub(MEMBERS)

    async def dies_after_two_chunks(name: str, transport: GroupTransport) -> None:
        for chunk in range(2):
            for reducer in ("a", "b"):
                await transport.send(reducer, part_chunk(reducer, values[name], chunk, weight=WEIGHTS[name]))
        await asyncio.sleep(0.05)
        hub.close(name)

    results = await run_group(values, WEIGHTS, settings=CHUNKED, behaviours={"c": dies_after_two_chunks}, hub=hub)
    with_c = weighted_mean(values, WEIGHTS)
    without_c = weighted_mean({member: values[member] for member in ("a", "b")}, WEIGHTS)
    for member, (result, report) in results.items():
        for reducer in ("a", "b"):
            for chunk, where in enumerate(chunks_of(reducer)):
                assert torch.equal(result[where], (with_c if chunk < 2 else without_c)[where]), (member, chunk)
            assert report.contributors[reducer] == ("a", "b")  # c is not in every chunk
            assert report.total_weight[reducer] == 3.0
        for where in chunks_of("c"):
            assert torch.equal(result[where], values[member][where])
        assert report.excluded["c"].cause == Cause.CONNECTION_LOST
        assert report.kept_local == ("c",)
        assert report.averaged_fraction == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("second", "detail"),
    [
        ({"chunk": 2}, "PART chunk 2 out of order: chunk 1 was due"),
        ({"chunk": 0}, "a second PART for chunk 0"),
        ({"chunk": 1, "at": 4}, "PART chunk 4 beyond the shard's 4 chunks"),
        ({"chunk": 1, "weight": 50.0}, "PART weight changed from 5.0 to 50.0"),
    ],
    ids=["skipped", "repeated", "beyond", "weight-changed"],
)
async def test_a_wrong_chunk_cuts_its_sender_off(second: dict, detail: str) -> None:
    values = tensors(MEMBERS, NUMEL)

    async def hostile(name: str, transport: GroupTransport) -> None:
        for reducer in ("a", "b"):
            await transport.send(reducer, part_chunk(reducer, values[name], 0, weight=WEIGHTS[name]))
            chunk = second["chunk"]
            bad = part_chunk(reducer, values[name], chunk, weight=second.get("weight", 5.0), at=second.get("at"))
            await transport.send(reducer, bad)
        await asyncio.sleep(3600)

    results = await run_group(values, WEIGHTS, settings=CHUNKED, behaviours={"c": hostile})
    without_c = weighted_mean({member: values[member] for member in ("a", "b")}, WEIGHTS)
    first = results["a"][0]
    for result, report in results.values():
        averaged = slice(0, chunks_of("b")[-1].stop)  # a's and b's shards; c's stays each member's own
        assert torch.equal(result[averaged], first[averaged])  # whichever chunks had c in them, both agree
        assert report.excluded["c"].cause == Cause.BAD_MESSAGE
        assert detail in report.excluded["c"].detail
        assert report.contributors["a"] == ("a", "b")
        for where in chunks_of("a")[1:]:
            assert torch.equal(result[where], without_c[where])  # every chunk after the cut is a and b alone
        assert report.duration_s < CHUNKED.reduce_timeout_s  # cut at once, not waited out


async def test_chunks_after_the_reduce_deadline_are_left_out_without_cutting_their_sender() -> None:
    values = tensors(MEMBERS, NUMEL)
    settings = ButterflySettings(reduce_timeout_s=0.3, gather_timeout_s=5.0, chunks_per_shard=4, min_chunk_elements=100)
    results_to_c: list[tuple[str, int]] = []

    async def late(name: str, transport: GroupTransport) -> None:
        for reducer in ("a", "b"):
            await transport.send(reducer, part_chunk(reducer, values[name], 0, weight=WEIGHTS[name]))
        await asyncio.sleep(0.6)  # past the reduce deadline
        for chunk in range(1, 4):
            for reducer in ("a", "b"):
                await transport.send(reducer, part_chunk(reducer, values[name], chunk, weight=WEIGHTS[name]))
        for reducer in ("a", "b"):  # after a's and b's PARTs to c (which c never reduces), their means
            while len([kind for peer, kind in results_to_c if peer == reducer and kind == KIND_RESULT]) < 4:
                message = parse_message(await transport.recv(reducer, timeout_s=5.0), group_size=3, max_weight=1e12)
                results_to_c.append((reducer, message.kind))

    results = await run_group(values, WEIGHTS, settings=settings, behaviours={"c": late})
    with_c = weighted_mean(values, WEIGHTS)
    without_c = weighted_mean({member: values[member] for member in ("a", "b")}, WEIGHTS)
    for result, report in results.values():
        assert report.excluded["c"].cause == Cause.MISSED_REDUCE_DEADLINE
        assert "1 of 4 PART chunks within reduce_timeout_s=0.3" in report.excluded["c"].detail
        for reducer in ("a", "b"):
            chunks = chunks_of(reducer)
            assert torch.equal(result[chunks[0]], with_c[chunks[0]])
            for where in chunks[1:]:
                assert torch.equal(result[where], without_c[where])
    assert [kind for _, kind in results_to_c].count(KIND_RESULT) == 8  # c, not cut off, still got every mean
