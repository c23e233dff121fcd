"""dedloc: two simulated peers follow one process that trains on the same global batch, step for step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch
from torch import nn

from hivewire.optim import AveragedTensorsRejected, AverageFn, Dedloc, parameter_hash
from hivewire.recipes import TinyClassifier, TinyLM, shard_seed

from ._group import MeanGroup

CPU = torch.device("cpu")
RECIPE = TinyLM()
PEERS = ("p-alice", "p-bob")
MICRO_BATCH = 8  # samples per micro-batch
MICRO_STEPS = 2  # micro-batches per peer per epoch
EPOCHS = 20
GLOBAL_BATCH = MICRO_BATCH * MICRO_STEPS * len(PEERS)
LOSS_TOLERANCE = 1e-4  # nats, per epoch; measured ≤ 2e-6 (float summation order differs)
PARAMETER_TOLERANCE = 1e-3  # max |Δ| of any parameter after EPOCHS; measured ~3e-5 (AdamW amplifies tiny gradients)


def single_process() -> tuple[list[float], nn.Module]:
    """The baseline: one process takes both peers' micro-batches into each step (global batch 32)."""
    model = RECIPE.build_model(0)
    optimizer = RECIPE.optimizer(model)
    streams = [RECIPE.batches(shard_seed(peer_id), MICRO_BATCH, CPU) for peer_id in PEERS]
    losses = []
    for _ in range(EPOCHS):
        total = 0.0
        for stream in streams:
            for _ in range(MICRO_STEPS):
                batch = next(stream)
                loss = RECIPE.loss(model, batch)
                (loss * MICRO_BATCH / GLOBAL_BATCH).backward()  # mean over the global batch
                total += loss.item() * MICRO_BATCH
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as DedlocConfig's default
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / GLOBAL_BATCH)
    return losses, model


async def dedloc_peer(peer_id: str, group: MeanGroup) -> tuple[list[float], list[str], nn.Module]:
    """One volunteer: accumulate its micro-batches, then average and step at each epoch boundary."""
    model = RECIPE.build_model(0)  # the run's seed: every peer starts from the same parameters
    strategy = Dedloc(model, RECIPE.optimizer(model), group.average)
    stream = RECIPE.batches(shard_seed(peer_id), MICRO_BATCH, CPU)
    loss_sums, hashes = [], []
    for _ in range(EPOCHS):
        total = 0.0
        for _ in range(MICRO_STEPS):
            batch = next(stream)
            loss = RECIPE.loss(model, batch)
            strategy.backward(loss, RECIPE.samples_in(batch))
            total += loss.item() * RECIPE.samples_in(batch)
        await strategy.astep()  # the group reached the global batch: average, then the same step everywhere
        loss_sums.append(total)
        hashes.append(parameter_hash(model))
    return loss_sums, hashes, model


async def test_two_peers_follow_the_single_process_run() -> None:
    """Same seeds, same samples, same global batch (2 peers × 2 micro-batches × 8 sequences), 20 epochs:
    the global loss stays within 1e-4 nats of the single-process loss every epoch, the final parameters
    within 1e-3, and both peers' parameter hashes are identical after every step."""
    group = MeanGroup(len(PEERS))
    (alice_sums, alice_hashes, alice), (bob_sums, bob_hashes, _) = await asyncio.gather(
        *(dedloc_peer(peer_id, group) for peer_id in PEERS)
    )
    baseline_losses, baseline = single_process()

    assert alice_hashes == bob_hashes
    assert len(set(alice_hashes)) == EPOCHS  # and the parameters did move every step
    collaborative_losses = [(a + b) / GLOBAL_BATCH for a, b in zip(alice_sums, bob_sums, strict=True)]
    for epoch, (ours, theirs) in enumerate(zip(collaborative_losses, baseline_losses, strict=True)):
        assert abs(ours - theirs) <= LOSS_TOLERANCE, (epoch, ours, theirs)
    assert collaborative_losses[-1] < 0.75 * collaborative_losses[0]
    drift = max((p - q).abs().max().item() for p, q in zip(alice.parameters(), baseline.parameters(), strict=True))
    assert drift <= PARAMETER_TOLERANCE
    parameter_bytes = sum(p.numel() * p.element_size() for p in alice.parameters())
    assert group.bytes_sent == EPOCHS * len(PEERS) * parameter_bytes  # one gradient per peer per step


def classifier_strategy(average: AverageFn) -> tuple[Dedloc, nn.Module]:
    """A dedloc peer of tiny-classifier with one micro-batch of 16 accumulated, ready to step."""
    recipe = TinyClassifier()
    model = recipe.build_model(0)
    strategy = Dedloc(model, recipe.optimizer(model), average)
    strategy.backward(recipe.loss(model, next(recipe.batches(shard_seed("p-solo"), 16, CPU))), 16)
    return strategy, model


def test_a_sync_callable_steps_and_a_group_of_one_is_local_training() -> None:
    calls: list[float] = []

    def alone(tensors: list[torch.Tensor], weight: float) -> list[torch.Tensor]:
        calls.append(weight)
        return tensors

    strategy, model = classifier_strategy(alone)
    before = parameter_hash(model)
    strategy.step()
    assert (calls, strategy.epoch, strategy.samples_accumulated) == ([16.0], 1, 0)
    assert parameter_hash(model) != before


def test_step_with_an_async_callable_asks_for_astep() -> None:
    async def average(tensors: list[torch.Tensor], weight: float) -> list[torch.Tensor]:
        return tensors

    strategy, model = classifier_strategy(average)
    before = parameter_hash(model)
    with pytest.raises(TypeError, match="astep"):
        strategy.step()
    assert (parameter_hash(model), strategy.epoch) == (before, 0)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda tensors: tensors[:-1], "returned 5 tensors, expected 6"),
        (lambda tensors: [t.reshape(-1) for t in tensors], "expected"),
        (lambda tensors: [t.double() for t in tensors], "float64"),
        (lambda tensors: [t.fill_(float("nan")) for t in tensors], "NaN"),
    ],
    ids=["count", "shape", "dtype", "nan"],
)
def test_a_bad_average_is_rejected_and_changes_nothing(
    corrupt: Callable[[list[torch.Tensor]], list[torch.Tensor]], message: str
) -> None:
    strategy, model = classifier_strategy(lambda tensors, weight: corrupt([t.clone() for t in tensors]))
    before = parameter_hash(model)
    with pytest.raises(AveragedTensorsRejected, match=message):
        strategy.step()
    assert (parameter_hash(model), strategy.epoch, strategy.samples_accumulated) == (before, 0, 16)
