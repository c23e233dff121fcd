"""Butterfly all-reduce over in-process queues: exact means, compression error, dead, stalled and hostile members."""

import asyncio
import math
from collections.abc import Mapping

import pytest
import torch

from hivewire.averaging import (
    BlockwiseInt8Compression,
    ButterflySettings,
    Cause,
    Float16Compression,
    InProcessHub,
    NoCompression,
    PeerUnreachable,
    butterfly_allreduce,
)
from hivewire.averaging.messages import KIND_RESULT, MAGIC, parse_message
from hivewire.averaging.partition import plan_partition
from hivewire.averaging.transport import GroupTransport
from tests.client.averaging._support import FAST, RELAXED, ROUND, part_message, run_group, tensors, weighted_mean

MEMBERS = ("a", "b", "c")
WEIGHTS = {"a": 1.0, "b": 2.0, "c": 5.0}
NUMEL = 100_003


def shard(member: str, numel: int = NUMEL, throughputs: Mapping[str, float] | None = None) -> slice:
    partition = plan_partition(numel, throughputs or dict.fromkeys(MEMBERS, 1.0))
    return partition.slice(partition.index(member))


async def test_three_peers_get_the_exact_weighted_mean_bit_for_bit() -> None:
    values = tensors(MEMBERS, NUMEL)
    results = await run_group(values, WEIGHTS)
    expected = weighted_mean(values, WEIGHTS)
    stacked = torch.stack([values[member].double() for member in MEMBERS])
    weights = torch.tensor([WEIGHTS[member] for member in MEMBERS], dtype=torch.float64)
    independent = ((stacked * weights[:, None]).sum(0) / weights.sum()).float()  # torch's own summation order
    for member, (result, report) in results.items():
        assert result.dtype == torch.float32
        assert torch.equal(result, expected), member
        assert torch.equal(result, independent), member
        assert report.excluded == {} and report.kept_local == () and report.averaged_fraction == 1.0
        assert report.contributors == dict.fromkeys(MEMBERS, MEMBERS)
        assert report.total_weight == dict.fromkeys(MEMBERS, 8.0)
        assert report.bytes_sent == report.bytes_received > 4 * NUMEL * 2 * 2 / 3  # 2·(n−1)/n of the tensor
    assert all(not torch.equal(values[member], expected) for member in MEMBERS)  # inputs left alone


@pytest.mark.parametrize("codec", [Float16Compression(), BlockwiseInt8Compression()], ids=["fp16", "int8"])
async def test_compressed_rounds_stay_within_the_documented_error(
    codec: Float16Compression | BlockwiseInt8Compression,
) -> None:
    values = tensors(MEMBERS, NUMEL)
    results = await run_group(values, WEIGHTS, codec=codec)
    exact = weighted_mean(values, WEIGHTS).double()
    total = sum(WEIGHTS.values())
    if codec.name == "fp16":  # one hop in, one hop out, each relative 2⁻¹¹
        hop_in = sum(values[member].double().abs() * WEIGHTS[member] for member in MEMBERS) / total * 2.0**-11
        bound = hop_in + (exact.abs() + hop_in) * 2.0**-11
    else:  # each hop ≤ absmax(block)/254; a block's absmax is at most the tensor's
        hop_in = sum(values[member].abs().max().item() * WEIGHTS[member] for member in MEMBERS) / total / 254
        bound = torch.full_like(exact, hop_in + (exact.abs().max().item() + hop_in) / 254)
    first = next(iter(results.values()))[0]
    for result, report in results.values():
        assert torch.equal(result, first)  # the reducer decodes what it sends: every member, same bits
        assert report.excluded == {}
    error = (first.double() - exact).abs()
    assert (error <= bound * (1 + 1e-6)).all()
    assert error.max() > 0


async def test_parts_follow_throughput_and_a_zero_throughput_member_only_sends() -> None:
    throughputs = {"a": 1.0, "b": 3.0, "c": 0.0}
    values = tensors(MEMBERS, 40_000)
    results = await run_group(values, WEIGHTS, throughputs=throughputs)
    expected = weighted_mean(values, WEIGHTS)
    for result, report in results.values():
        assert torch.equal(result, expected)
        assert report.partition.sizes == (10_000, 30_000, 0)
        assert set(report.contributors) == {"a", "b"}
    received = {member: report.bytes_received for member, (_, report) in results.items()}
    overhead = 36 + 16  # message header + codec header (each shard here is one chunk)
    assert received["a"] == 2 * (4 * 10_000 + overhead) + (4 * 30_000 + overhead)  # two parts of its shard, b's mean
    assert received["b"] == 2 * (4 * 30_000 + overhead) + (4 * 10_000 + overhead)
    assert received["c"] == 4 * 40_000 + 2 * overhead  # the two means only: it reduces nothing


async def test_weights_of_zero() -> None:
    values = tensors(MEMBERS, 999)
    one_idle = {"a": 0.0, "b": 2.0, "c": 3.0}
    results = await run_group(values, one_idle)
    assert torch.equal(results["a"][0], weighted_mean(values, one_idle))
    assert results["a"][1].contributors["b"] == MEMBERS  # sent, counted as present, weighs nothing
    all_idle = dict.fromkeys(MEMBERS, 0.0)
    results = await run_group(values, all_idle)  # nothing to weigh by: a plain mean
    assert torch.equal(results["a"][0], weighted_mean(values, dict.fromkeys(MEMBERS, 1.0)))
    assert results["a"][1].total_weight["a"] == 0.0


def _survivor_check(
    results: Mapping[str, tuple[torch.Tensor, object]], values: Mapping[str, torch.Tensor], mean_of: tuple[str, ...]
) -> None:
    """Survivors' shards hold the weighted mean of ``mean_of``; the lost member's shard keeps local values."""
    expected = weighted_mean({member: values[member] for member in mean_of}, WEIGHTS)
    for member, (result, _) in results.items():
        for reducer in ("a", "b"):
            assert torch.equal(result[shard(reducer)], expected[shard(reducer)]), (member, reducer)
        assert torch.equal(result[shard("c")], values[member][shard("c")]), member


async def test_member_dead_from_the_start_is_excluded_at_once_and_a_retry_without_it_completes() -> None:
    values = tensors(MEMBERS, NUMEL)
    settings = ButterflySettings(reduce_timeout_s=10.0, gather_timeout_s=10.0)

    async def dies(name: str, transport: GroupTransport) -> None:
        hub.close(name)

    hub = InProcessHub(MEMBERS)
    results = await run_group(values, WEIGHTS, settings=settings, behaviours={"c": dies}, hub=hub)
    _survivor_check(results, values, ("a", "b"))
    for _, report in results.values():
        assert report.excluded["c"].cause == Cause.CONNECTION_LOST
        assert report.kept_local == ("c",)
        assert report.averaged_fraction == pytest.approx(2 / 3, abs=1e-4)
        assert report.duration_s < settings.reduce_timeout_s  # a closed link is noticed, not waited out
    survivors = {member: values[member] for member in ("a", "b")}
    retried = await run_group(survivors, WEIGHTS)
    assert all(torch.equal(result, weighted_mean(survivors, WEIGHTS)) for result, _ in retried.values())


class _DiesBeforeResults:
    """A member's transport that works for the parts and kills the member as it starts sending results."""

    def __init__(self, hub: InProcessHub, name: str) -> None:
        self.hub, self.name, self.inner = hub, name, hub.transport(name)

    async def send(self, peer: str, data: bytes | bytearray) -> None:
        if parse_message(data, group_size=3, max_weight=1e12).kind == KIND_RESULT:
            self.hub.close(self.name)
        await self.inner.send(peer, data)

    async def recv(self, peer: str, *, timeout_s: float) -> bytes | bytearray:
        return await self.inner.recv(peer, timeout_s=timeout_s)


async def test_member_killed_mid_round_leaves_the_others_a_correct_round_within_the_deadline() -> None:
    values = tensors(MEMBERS, NUMEL)
    hub = InProcessHub(MEMBERS)

    async def killed_after_parts(name: str, transport: GroupTransport) -> None:
        await butterfly_allreduce(
            values[name],
            me=name,
            throughputs=dict.fromkeys(MEMBERS, 1.0),
            weight=WEIGHTS[name],
            round_id=ROUND,
            transport=_DiesBeforeResults(hub, name),
            codec=NoCompression(),
            settings=FAST,
        )

    results = await run_group(values, WEIGHTS, behaviours={"c": killed_after_parts}, hub=hub)
    _survivor_check(results, values, MEMBERS)  # its parts arrived before it died, so they count
    for _, report in results.values():
        assert report.excluded["c"].cause == Cause.CONNECTION_LOST
        assert report.contributors["a"] == MEMBERS
        assert report.duration_s < RELAXED.reduce_timeout_s  # its death is noticed, not waited out


async def test_stalled_member_is_waited_for_until_the_deadlines_only() -> None:
    values = tensors(MEMBERS, 3000)
    settings = ButterflySettings(reduce_timeout_s=0.3, gather_timeout_s=0.3)

    async def stalls(name: str, transport: GroupTransport) -> None:
        await asyncio.sleep(3600)

    results = await run_group(values, WEIGHTS, settings=settings, behaviours={"c": stalls})
    expected = weighted_mean({member: values[member] for member in ("a", "b")}, WEIGHTS)
    for member, (result, report) in results.items():
        assert torch.equal(result[shard("a", 3000)], expected[shard("a", 3000)])
        assert torch.equal(result[shard("c", 3000)], values[member][shard("c", 3000)])
        assert report.excluded["c"].cause == Cause.MISSED_REDUCE_DEADLINE
        assert "reduce_timeout_s=0.3" in report.excluded["c"].detail
        assert report.kept_local == ("c",)
        assert report.duration_s > 0.55  # both deadlines waited out (an upper bound would time the machine)


def _garbage(kind: str, numel: int, reducer: str) -> list[bytes]:
    """What a hostile member ``c`` sends ``reducer`` instead of its part."""
    throughputs = dict.fromkeys(MEMBERS, 1.0)
    good = torch.randn(numel)
    part = part_message(throughputs, numel, reducer, good)
    nan = good.clone()
    nan[shard(reducer, numel)][7] = math.nan
    return {
        "nan": [part_message(throughputs, numel, reducer, nan)],
        "inf-weight": [part_message(throughputs, numel, reducer, good, weight=math.inf)],
        "negative-weight": [part_message(throughputs, numel, reducer, good, weight=-1.0)],
        "huge-weight": [part_message(throughputs, numel, reducer, good, weight=1e13)],
        "wrong-size": [part_message(throughputs, numel + 30, reducer, torch.randn(numel + 30))],
        "wrong-dtype": [part_message(throughputs, numel, reducer, good.double())],
        "oversized": [part + bytes(10 * len(part))],
        "wrong-shard": [part_message(throughputs, numel, reducer, good, shard=2)],
        "wrong-codec": [part_message(throughputs, numel, reducer, good, codec=Float16Compression())],
        "bad-magic": [b"EVIL" + part[len(MAGIC) :]],
        "old-version": [part[: len(MAGIC)] + bytes([1]) + part[len(MAGIC) + 1 :]],  # before chunks
        "truncated": [part[:20]],
        "lying-numel": [part[:40] + (numel // 3 + 1).to_bytes(8, "little") + part[48:]],
        "twice": [part, part],
    }[kind]


GARBAGE = {
    "nan": "non-finite",
    "inf-weight": "weight must be finite",
    "negative-weight": "weight must be finite",
    "huge-weight": "weight must be finite",
    "wrong-size": "must hold",
    "wrong-dtype": "dtype must be torch.float32",
    "oversized": "must be",
    "wrong-shard": "PART for shard 2",
    "wrong-codec": "codec must be 0",
    "bad-magic": "must start with",
    "old-version": "message version must be 2, got 1",
    "truncated": "shorter than",
    "lying-numel": "must hold",
    "twice": "a second PART",
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
async def test_member_sending_garbage_is_excluded_and_the_round_completes_for_the_rest(kind: str) -> None:
    values = tensors(MEMBERS, 3000)
    settings = ButterflySettings(reduce_timeout_s=5.0, gather_timeout_s=5.0)

    async def hostile(name: str, transport: GroupTransport) -> None:
        for reducer in ("a", "b"):
            for message in _garbage(kind, 3000, reducer):
                await transport.send(reducer, message)
        await asyncio.sleep(3600)

    results = await run_group(values, WEIGHTS, settings=settings, behaviours={"c": hostile})
    expected = weighted_mean({member: values[member] for member in ("a", "b")}, WEIGHTS)
    for member, (result, report) in results.items():
        assert torch.equal(result[shard("b", 3000)], expected[shard("b", 3000)]), member
        exclusion = report.excluded["c"]
        assert exclusion.cause == Cause.BAD_MESSAGE
        assert GARBAGE[kind] in exclusion.detail
        assert report.contributors[member] == ("a", "b")
        assert report.kept_local == ("c",)
        assert report.duration_s < settings.reduce_timeout_s  # cut off at once, not waited out


async def test_hostile_result_is_refused_and_that_shard_kept_local() -> None:
    values = tensors(MEMBERS, 3000)
    throughputs = dict.fromkeys(MEMBERS, 1.0)

    async def lies_in_results(name: str, transport: GroupTransport) -> None:
        for reducer in ("a", "b"):
            await transport.send(reducer, part_message(throughputs, 3000, reducer, values[name], weight=5.0))
        for reducer in ("a", "b"):  # once both reduced (their PART, then RESULT came), a RESULT of NaN
            for _ in range(2):
                await transport.recv(reducer, timeout_s=5.0)
        for reducer in ("a", "b"):
            bad = part_message(throughputs, 3000, name, torch.full((3000,), math.nan))
            await transport.send(reducer, bad[:5] + bytes([KIND_RESULT]) + bad[6:24] + b"\x07" + bad[25:])
        await asyncio.sleep(3600)

    results = await run_group(values, WEIGHTS, behaviours={"c": lies_in_results})
    expected = weighted_mean(values, WEIGHTS)
    for member, (result, report) in results.items():
        assert torch.equal(result[shard("a", 3000)], expected[shard("a", 3000)])  # its part was sound and used
        assert torch.equal(result[shard("c", 3000)], values[member][shard("c", 3000)])
        assert report.excluded["c"].cause == Cause.BAD_MESSAGE and "non-finite" in report.excluded["c"].detail


async def test_message_of_another_round_is_dropped_without_excluding_its_sender() -> None:
    values = tensors(MEMBERS, 3000)
    hub = InProcessHub(MEMBERS)
    stale = part_message(dict.fromkeys(MEMBERS, 1.0), 3000, "a", values["c"], round_id="round-0")
    await hub.transport("c").send("a", stale)
    results = await run_group(values, WEIGHTS, hub=hub)
    assert all(torch.equal(result, weighted_mean(values, WEIGHTS)) for result, _ in results.values())
    assert all(report.excluded == {} for _, report in results.values())


async def test_late_result_after_gather_deadline_is_reported() -> None:
    values = tensors(("a", "b"), 100)
    settings = ButterflySettings(reduce_timeout_s=0.2, gather_timeout_s=0.2)

    async def sends_part_only(name: str, transport: GroupTransport) -> None:
        await transport.send("a", part_message({"a": 1.0, "b": 1.0}, 100, "a", values[name]))
        await asyncio.sleep(3600)

    results = await run_group(values, WEIGHTS, settings=settings, behaviours={"b": sends_part_only})
    result, report = results["a"]
    assert report.excluded["b"].cause == Cause.MISSED_GATHER_DEADLINE
    assert report.contributors == {"a": ("a", "b")}
    assert torch.equal(result[50:], values["a"][50:])


async def test_single_member_group_and_shapes() -> None:
    values = {"a": torch.randn(3, 4, 5)}
    results = await run_group(values, {"a": 2.0})
    assert torch.equal(results["a"][0], values["a"])
    matrices = {member: torch.randn(30, 7) for member in MEMBERS}
    results = await run_group(matrices, WEIGHTS)
    flat = weighted_mean({member: matrix.reshape(-1) for member, matrix in matrices.items()}, WEIGHTS)
    assert torch.equal(results["b"][0], flat.view(30, 7))


async def test_bad_local_input_is_refused_before_anything_is_sent() -> None:
    hub = InProcessHub(MEMBERS)

    async def average(tensor: torch.Tensor, me: str = "a", weight: float = 1.0) -> None:
        await butterfly_allreduce(
            tensor,
            me=me,
            throughputs=dict.fromkeys(MEMBERS, 1.0),
            weight=weight,
            round_id=ROUND,
            transport=hub.transport("a"),
            codec=NoCompression(),
        )

    with pytest.raises(ValueError, match="NaN or Inf"):
        await average(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="not in the group"):
        await average(torch.ones(2), me="z")
    with pytest.raises(ValueError, match="weight must be finite"):
        await average(torch.ones(2), weight=-1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        ButterflySettings(reduce_timeout_s=0)
    with pytest.raises(PeerUnreachable, match="not a member"):
        await hub.transport("a").send("z", b"")


async def test_float64_tensors_are_averaged_in_float64_and_left_untouched() -> None:
    values = {member: tensor.double() for member, tensor in tensors(MEMBERS, 1001).items()}
    originals = {member: tensor.clone() for member, tensor in values.items()}
    results = await run_group(values, WEIGHTS)
    expected = (values["a"] * WEIGHTS["a"] + values["b"] * WEIGHTS["b"] + values["c"] * WEIGHTS["c"]) / 8.0
    for member, (result, _) in results.items():
        assert result.dtype == torch.float64
        assert torch.equal(result, expected)
        assert torch.equal(values[member], originals[member])
