"""diloco with `overlap`: the outer step lands one round late, the peers compute while the group averages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch
from torch import nn

from hivewire.optim import Diloco, DilocoConfig, state_hash
from hivewire.recipes import TinyClassifier, shard_seed

from ._group import MeanGroup

CPU = torch.device("cpu")
RECIPE = TinyClassifier()
LR, MOMENTUM = 0.7, 0.9  # the outer optimizer's defaults


@dataclass
class Answered:
    """A round whose answer is fixed in advance (None: the round did not happen); `arrived` says if it is there."""

    answer: list[torch.Tensor] | None
    arrived: bool = False

    def done(self) -> bool:
        return self.arrived

    def result(self) -> list[torch.Tensor] | None:
        return self.answer


class Scripted:
    """A StartFn that records what each round carried and answers with `answers` in turn."""

    def __init__(self, answers: list[list[torch.Tensor] | None]) -> None:
        self.answers = answers
        self.sent: list[list[torch.Tensor]] = []
        self.rounds: list[Answered] = []

    def __call__(self, tensors: list[torch.Tensor], weight: float) -> Answered:
        self.sent.append([tensor.clone() for tensor in tensors])
        self.rounds.append(Answered(self.answers[len(self.sent) - 1]))
        return self.rounds[-1]


def one_parameter(start: Scripted, inner_steps: int = 1) -> tuple[nn.Parameter, Diloco]:
    """One parameter with plain SGD inner steps (lr 0.1), so every number can be followed by hand."""
    weight = nn.Parameter(torch.zeros(2))
    model = nn.Module()
    model.weight = weight
    config = DilocoConfig(inner_steps=inner_steps, clip_grad_norm=None, overlap=True)
    return weight, Diloco(model, torch.optim.SGD([weight], lr=0.1), start, config)


def inner_step(weight: nn.Parameter, strategy: Diloco) -> None:
    strategy.backward(-weight.sum(), samples=1)  # gradient −1 everywhere: each inner step adds 0.1
    strategy.step()


def test_the_outer_step_applied_is_the_previous_rounds_average() -> None:
    """Round 0 carries +0.1 and the group answers −0.5; the anchor moves by round 0's answer only at the end of
    window 1, and window 1's own movement rides on top of the new anchor until round 1 settles it."""
    group_answer = [torch.full((2,), -0.5)]
    start = Scripted([group_answer, None, None])
    weight, strategy = one_parameter(start)

    inner_step(weight, strategy)  # window 0 ends: nothing to apply, round 0 submitted
    assert strategy.epoch == 0 and strategy.rounds_in_flight == 1
    assert torch.equal(start.sent[0][0], torch.full((2,), -0.1))  # g_0 = s_0 − e_0
    assert torch.equal(strategy.anchor[0], torch.zeros(2))
    assert torch.allclose(weight.detach(), torch.full((2,), 0.1))  # a_0 − g_0: training goes on where it was

    inner_step(weight, strategy)  # window 1 ends: round 0's answer moves the anchor (Nesterov: 1.9 × lr × ḡ)
    assert strategy.epoch == 1
    assert torch.allclose(strategy.anchor[0], torch.full((2,), LR * (1 + MOMENTUM) * 0.5))
    assert torch.allclose(start.sent[1][0], torch.full((2,), -0.1))  # g_1 is window 1's movement alone
    assert torch.allclose(weight.detach(), strategy.anchor[0] + 0.1)


def test_an_answer_that_arrives_mid_window_is_applied_at_once_with_the_same_numbers() -> None:
    """H = 3; round 0's answer arrives after window 1's first step: the anchor moves then (so peers enter the
    epoch when the round ends), the local parameters move along, and window 1's movement is unchanged."""
    start = Scripted([[torch.full((2,), -0.5)], None])
    weight, strategy = one_parameter(start, inner_steps=3)
    for _ in range(4):
        inner_step(weight, strategy)
    assert strategy.epoch == 0  # not there yet: training goes on
    start.rounds[0].arrived = True
    inner_step(weight, strategy)
    moved = LR * (1 + MOMENTUM) * 0.5
    assert strategy.epoch == 1 and torch.allclose(strategy.anchor[0], torch.full((2,), moved))
    assert torch.allclose(weight.detach(), torch.full((2,), moved + 0.3 + 0.2))  # a_1 − g_0 + two steps
    inner_step(weight, strategy)
    assert strategy.epoch == 1 and torch.allclose(start.sent[1][0], torch.full((2,), -0.3))


def test_a_skipped_round_keeps_the_local_movement() -> None:
    """No answer for round 0: the anchor takes our own g_0, so window 0's work is not lost."""
    start = Scripted([None, None])
    weight, strategy = one_parameter(start, inner_steps=2)
    for _ in range(4):
        inner_step(weight, strategy)
    assert strategy.epoch == 1
    assert torch.allclose(strategy.anchor[0], torch.full((2,), LR * (1 + MOMENTUM) * 0.2))


def test_a_rejected_answer_counts_as_a_skipped_round() -> None:
    """A wrong-shaped average from the network is refused; the local movement stands in, the run goes on."""
    start = Scripted([[torch.zeros(3)], None])
    weight, strategy = one_parameter(start)
    inner_step(weight, strategy)
    inner_step(weight, strategy)
    assert strategy.epoch == 1
    assert torch.allclose(strategy.anchor[0], torch.full((2,), LR * (1 + MOMENTUM) * 0.1))


def classifier_peer(group: MeanGroup, inner_steps: int) -> Diloco:
    model = RECIPE.build_model(0)
    config = DilocoConfig(inner_steps=inner_steps, overlap=True)
    return Diloco(model, RECIPE.optimizer(model), group.start, config)


async def train(peer_id: str, strategy: Diloco, steps: int, hashes: list[str]) -> None:
    stream = RECIPE.batches(shard_seed(peer_id), 16, CPU)
    for _ in range(steps):
        batch = next(stream)
        strategy.backward(RECIPE.loss(strategy.model, batch), RECIPE.samples_in(batch))
        epoch = strategy.epoch
        await strategy.astep()
        if strategy.epoch != epoch:
            hashes.append(state_hash(strategy.agreed_state()))


async def test_peers_anchors_stay_bit_identical_across_rounds() -> None:
    """Two peers on different data, 5 windows of 4 steps: after every outer step both anchors hash alike,
    their local models differ (each carries its own window), and after `afinish` the final models are equal."""
    group = MeanGroup(2)
    peers = {peer_id: classifier_peer(group, 4) for peer_id in ("p-alice", "p-bob")}
    hashes: dict[str, list[str]] = {peer_id: [] for peer_id in peers}
    await asyncio.gather(*(train(peer_id, peer, 20, hashes[peer_id]) for peer_id, peer in peers.items()))
    alice, bob = peers.values()
    assert len(hashes["p-alice"]) == 4 and hashes["p-alice"] == hashes["p-bob"]
    assert len(set(hashes["p-alice"])) == 4  # the anchor moved every round
    assert state_hash(alice.model.state_dict()) != state_hash(bob.model.state_dict())
    assert alice.rounds_in_flight == bob.rounds_in_flight == 1
    await asyncio.gather(alice.afinish(), bob.afinish())
    assert (alice.epoch, bob.epoch, group.rounds) == (5, 5, 5)
    assert state_hash(alice.model.state_dict()) == state_hash(bob.model.state_dict())
    assert state_hash(alice.model.state_dict()) == state_hash(alice.agreed_state())


async def test_a_peer_computes_while_its_round_is_held_back() -> None:
    """The group's transport is held by an event: a whole window of inner steps runs with the round in flight,
    and only the next boundary waits for it."""
    group = MeanGroup(1)
    group.gate = asyncio.Event()
    strategy = classifier_peer(group, 3)
    await train("p-alice", strategy, 3, [])  # window 0 ends: round 0 submitted, held at the gate
    moved = state_hash(strategy.model.state_dict())
    await train("p-alice", strategy, 2, [])  # two of window 1's three inner steps, the round still held
    assert (group.rounds, strategy.rounds_in_flight, strategy.inner_steps_done, strategy.epoch) == (0, 1, 2, 0)
    assert state_hash(strategy.model.state_dict()) != moved
    group.gate.set()
    await train("p-alice", strategy, 1, [])  # window 1 ends: round 0 is collected and applied
    assert (group.rounds, strategy.epoch, strategy.rounds_in_flight) == (1, 1, 1)


def test_a_loaded_state_drops_the_round_in_flight() -> None:
    """A late joiner's (or a diverged peer's) state replaces everything local, the round in flight included."""
    start = Scripted([[torch.ones(2)], None])
    weight, strategy = one_parameter(start)
    inner_step(weight, strategy)
    donor_start = Scripted([None])
    _, donor = one_parameter(donor_start)
    strategy.load_state_dict(donor.state_dict())
    assert strategy.rounds_in_flight == 0 and strategy.epoch == 0
    inner_step(weight, strategy)  # a fresh window 0: nothing applied, a new round submitted
    assert strategy.epoch == 0 and torch.equal(strategy.anchor[0], torch.zeros(2))


async def test_a_joiner_loads_the_anchor_every_peer_holds_not_a_donors_window() -> None:
    """Mid-run, with a round in flight and a window of local work on the donor: the state a joiner downloads is
    the agreed anchor (the same from either peer), at the agreed epoch, with no round in flight."""
    group = MeanGroup(2)
    alice, bob = classifier_peer(group, 4), classifier_peer(group, 4)
    await asyncio.gather(train("p-alice", alice, 10, []), train("p-bob", bob, 10, []))
    assert alice.rounds_in_flight == 1 and alice.inner_steps_done == 2
    joiner = classifier_peer(MeanGroup(1), 4)
    joiner.load_state_dict(alice.state_dict())
    assert (joiner.epoch, joiner.rounds_in_flight) == (alice.epoch, 0)
    assert state_hash(joiner.model.state_dict()) == state_hash(alice.agreed_state()) == state_hash(bob.agreed_state())
    assert state_hash(joiner.model.state_dict()) != state_hash(alice.model.state_dict())
    await asyncio.gather(alice.afinish(), bob.afinish())  # the group's pending round, so no task is left behind
