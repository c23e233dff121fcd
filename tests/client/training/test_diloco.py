"""diloco: two simulated peers averaging every 20 inner steps get close to one process averaging every step."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch
from torch import nn

from hivewire.optim import Diloco, DilocoConfig, parameter_hash
from hivewire.recipes import TinyLM, shard_seed

from ._group import MeanGroup

CPU = torch.device("cpu")
RECIPE = TinyLM()
PEERS = ("p-alice", "p-bob")
BATCH = 8  # samples per peer per inner step; the baseline's global batch is 2 × 8
STEPS = 100  # inner steps per peer = baseline steps: both see the same samples
INNER_STEPS = 20  # H
MARGIN = 1.15  # diloco's held-out loss ≤ 1.15 × the baseline's; measured 1.08 (2.05 vs 1.90 nats)
# With overlap each averaged window lands 20 of the 100 steps late (and the last only when leaving); measured
# 1.21 (2.27 vs 1.87 nats). The papers' H in the hundreds over many rounds make that staleness small.
OVERLAP_MARGIN = 1.30


def held_out_loss(model: nn.Module) -> float:
    """Mean loss on 2 × 64 sequences of a shard no peer trains on."""
    batches = itertools.islice(RECIPE.batches(shard_seed("p-held-out"), 64, CPU), 2)
    with torch.no_grad():
        return sum(RECIPE.loss(model, batch).item() for batch in batches) / 2


def single_process() -> nn.Module:
    """The baseline: each step takes both peers' batches (global batch 16), as dedloc would across peers."""
    model = RECIPE.build_model(0)
    optimizer = RECIPE.optimizer(model)
    streams = [RECIPE.batches(shard_seed(peer_id), BATCH, CPU) for peer_id in PEERS]
    for _ in range(STEPS):
        for stream in streams:
            (RECIPE.loss(model, next(stream)) / len(PEERS)).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


async def diloco_peer(peer_id: str, group: MeanGroup, overlap: bool) -> tuple[nn.Module, Diloco]:
    """One volunteer: an inner AdamW step per batch; every 20th step also averages and takes the outer step
    (with overlap: submits the round and applies the previous one; the last one is collected when leaving)."""
    model = RECIPE.build_model(0)
    config = DilocoConfig(inner_steps=INNER_STEPS, overlap=overlap)
    strategy = Diloco(model, RECIPE.optimizer(model), group.start if overlap else group.average, config)
    stream = RECIPE.batches(shard_seed(peer_id), BATCH, CPU)
    for _ in range(STEPS):
        batch = next(stream)
        strategy.backward(RECIPE.loss(model, batch), RECIPE.samples_in(batch))
        await strategy.astep()
    await strategy.afinish()
    return model, strategy


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
async def test_two_peers_get_close_to_the_single_process_run_with_20x_fewer_bytes(overlap: bool) -> None:
    """Same seeds and samples (2 peers × 100 steps × 8 sequences): diloco's held-out loss is within 15% of
    the single-process run's, while the peers hand the averaging callable 20× fewer bytes than dedloc would
    (one gradient per peer per step; test_dedloc checks that count). With overlap every outer step is one
    window stale, hence a wider margin (OVERLAP_MARGIN)."""
    group = MeanGroup(len(PEERS))
    (alice, alice_strategy), (bob, _) = await asyncio.gather(
        *(diloco_peer(peer_id, group, overlap) for peer_id in PEERS)
    )
    baseline = single_process()

    assert parameter_hash(alice) == parameter_hash(bob)  # the anchor after the last outer step
    assert (group.rounds, alice_strategy.epoch) == (STEPS // INNER_STEPS, STEPS // INNER_STEPS)
    initial, ours, theirs = held_out_loss(RECIPE.build_model(0)), held_out_loss(alice), held_out_loss(baseline)
    assert ours < 0.5 * initial
    assert ours <= (OVERLAP_MARGIN if overlap else MARGIN) * theirs, (ours, theirs)
    dedloc_bytes = STEPS * len(PEERS) * sum(p.numel() * p.element_size() for p in alice.parameters())
    assert dedloc_bytes >= 10 * group.bytes_sent
    assert dedloc_bytes == INNER_STEPS * group.bytes_sent


def test_the_outer_step_is_nesterov_sgd_on_the_pseudo_gradient() -> None:
    """One parameter, plain SGD inner steps: the anchor moves by lr·(1 + momentum)·Δ on the first round."""
    weight = nn.Parameter(torch.zeros(3))
    model = nn.Module()
    model.weight = weight
    inner = torch.optim.SGD([weight], lr=0.1)
    strategy = Diloco(model, inner, lambda tensors, weight: tensors, DilocoConfig(inner_steps=2, clip_grad_norm=None))
    for _ in range(2):
        strategy.backward(-weight.sum() - 3.0, samples=1)  # gradient −1 everywhere: each inner step adds 0.1
        strategy.step()
    # pseudo-gradient = anchor − local = −0.2; Nesterov: update = g + momentum·(momentum·0 + g) = 1.9·g
    assert torch.allclose(weight.detach(), torch.full((3,), 0.7 * 1.9 * 0.2))
    assert strategy.inner_steps_done == 0 and strategy.epoch == 1


def test_inner_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="inner_steps"):
        DilocoConfig(inner_steps=0)
