"""Helpers for averaging tests: a group run over in-process queues, the float64 reference, hostile peers.

Tests with real aiortc Links restrict host candidates to 127.0.0.1 (see test_link_transport.py): nothing
here sends a packet off loopback.
"""

import asyncio
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import torch

from hivewire.averaging import (
    ButterflySettings,
    Codec,
    InProcessHub,
    NoCompression,
    RoundReport,
    butterfly_allreduce,
)
from hivewire.averaging.messages import KIND_PART, encode_message, round_tag
from hivewire.averaging.partition import plan_partition
from hivewire.averaging.transport import GroupTransport

ROUND = "round-1"
FAST = ButterflySettings(reduce_timeout_s=1.0, gather_timeout_s=1.0)
# For rounds where no deadline should fire: a loaded CI machine must not turn a slow encode into an exclusion.
RELAXED = ButterflySettings(reduce_timeout_s=30.0, gather_timeout_s=30.0)

Behaviour = Callable[[str, GroupTransport], Coroutine[Any, Any, None]]


def tensors(members: Sequence[str], numel: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {member: torch.randn(numel, generator=generator) * (i + 1) for i, member in enumerate(members)}


def weighted_mean(values: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """The reference: Σ wᵢ·xᵢ in float64 in sorted member order, / Σ wᵢ, rounded to float32."""
    accumulator = torch.zeros_like(next(iter(values.values())), dtype=torch.float64)
    for member in sorted(values):
        accumulator += values[member].double() * weights[member]
    return (accumulator / sum(weights[member] for member in sorted(values))).float()


async def run_group(
    values: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    *,
    throughputs: Mapping[str, float] | None = None,
    codec: Codec | None = None,
    settings: ButterflySettings = RELAXED,
    behaviours: Mapping[str, Behaviour] | None = None,
    hub: InProcessHub | None = None,
    transports: Mapping[str, GroupTransport] | None = None,
) -> dict[str, tuple[torch.Tensor, RoundReport]]:
    """Run one round; members named in ``behaviours`` run that coroutine instead of the butterfly, those in
    ``transports`` average over that transport instead of the hub's."""
    behaviours = behaviours or {}
    throughputs = throughputs or dict.fromkeys(values, 1.0)
    hub = hub or InProcessHub(sorted(throughputs))
    honest = [member for member in sorted(throughputs) if member not in behaviours]

    async def member_round(member: str) -> tuple[torch.Tensor, RoundReport]:
        return await butterfly_allreduce(
            values[member],
            me=member,
            throughputs=throughputs,
            weight=weights[member],
            round_id=ROUND,
            transport=(transports or {}).get(member) or hub.transport(member),
            codec=codec or NoCompression(),
            settings=settings,
        )

    async with asyncio.TaskGroup() as tasks:
        others = [tasks.create_task(behaviour(name, hub.transport(name))) for name, behaviour in behaviours.items()]
        results = await asyncio.gather(*(member_round(member) for member in honest))
        for task in others:
            task.cancel()
    return dict(zip(honest, results, strict=True))


def part_message(
    throughputs: Mapping[str, float],
    numel: int,
    reducer: str,
    values: torch.Tensor,
    *,
    weight: float = 1.0,
    shard: int | None = None,
    chunk: int = 0,
    round_id: str = ROUND,
    codec: Codec | None = None,
) -> bytes:
    """A PART as an honest member would send it to ``reducer`` (its shard in one chunk, as under the default
    chunking for small tensors), with fields a test can falsify."""
    partition = plan_partition(numel, throughputs)
    index = partition.index(reducer)
    return bytes(
        encode_message(
            KIND_PART,
            shard=index if shard is None else shard,
            chunk=chunk,
            tag=round_tag(round_id),
            weight=weight,
            contributors=0,
            codec=codec or NoCompression(),
            values=values[partition.slice(index)],
        )
    )
