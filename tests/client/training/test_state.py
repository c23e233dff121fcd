"""Training state for late joiners: a snapshot loads bit-identically, and a bad one changes nothing."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from hivewire.optim import Dedloc, Diloco, DilocoConfig, StateRejected, Strategy, parameter_hash
from hivewire.recipes import TinyClassifier, shard_seed

CPU = torch.device("cpu")
RECIPE = TinyClassifier()


def alone(tensors: list[torch.Tensor], weight: float) -> list[torch.Tensor]:
    """A group of one: the average of this peer's tensors is themselves."""
    return tensors


def dedloc(seed: int) -> Strategy:
    model = RECIPE.build_model(seed)
    return Dedloc(model, RECIPE.optimizer(model), alone)


def diloco(seed: int) -> Strategy:
    model = RECIPE.build_model(seed)
    return Diloco(model, RECIPE.optimizer(model), alone, DilocoConfig(inner_steps=3))


def train(strategy: Strategy, peer_id: str, steps: int) -> None:
    for batch in itertools.islice(RECIPE.batches(shard_seed(peer_id), 32, CPU), steps):
        strategy.backward(RECIPE.loss(strategy.model, batch), RECIPE.samples_in(batch))
        strategy.step()


@pytest.mark.parametrize("make", [dedloc, diloco], ids=["dedloc", "diloco"])
def test_a_loaded_snapshot_is_bit_identical_and_trains_identically(make: Callable[[int], Strategy]) -> None:
    donor, joiner = make(0), make(1)
    train(donor, "p-donor", 6)  # diloco: two full rounds, so the snapshot is taken at an anchor
    joiner.load_state_dict(donor.state_dict())
    assert joiner.epoch == donor.epoch > 0
    for mine, theirs in zip(joiner.model.state_dict().values(), donor.model.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)
    train(donor, "p-next", 3)
    train(joiner, "p-next", 3)  # the optimizer state came along: the same data gives the same parameters
    assert parameter_hash(joiner.model) == parameter_hash(donor.model)


def test_a_diloco_snapshot_leaves_out_unaveraged_local_work() -> None:
    donor, joiner = diloco(0), diloco(1)
    train(donor, "p-donor", 4)  # one round of 3, then one inner step past the anchor
    joiner.load_state_dict(donor.state_dict())
    assert isinstance(donor, Diloco)
    assert all(torch.equal(p, a) for p, a in zip(joiner.model.parameters(), donor.anchor, strict=True))
    assert parameter_hash(joiner.model) != parameter_hash(donor.model)


def _nan_weight(state: dict[str, Any]) -> None:
    state["model"]["0.weight"].fill_(float("nan"))


def _wrong_moment_shape(state: dict[str, Any]) -> None:
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(7)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda state: state.update(strategy="diloco"), "strategy 'diloco'"),
        (lambda state: state.update(epoch=-1), "epoch"),
        (lambda state: state["model"].pop("0.bias"), "entries differ"),
        (_nan_weight, "NaN"),
        (_wrong_moment_shape, "exp_avg of parameter 0"),
        (lambda state: state["optimizer"]["param_groups"].clear(), "parameter groups"),
    ],
    ids=["strategy", "epoch", "missing", "nan", "moment-shape", "groups"],
)
def test_a_bad_state_is_rejected_and_changes_nothing(damage: Callable[[dict[str, Any]], object], message: str) -> None:
    donor, joiner = dedloc(0), dedloc(1)
    train(donor, "p-donor", 2)
    state = copy.deepcopy(donor.state_dict())
    damage(state)
    before = (parameter_hash(joiner.model), copy.deepcopy(joiner.optimizer.state_dict()), joiner.epoch)
    with pytest.raises(StateRejected, match=message):
        joiner.load_state_dict(state)
    assert (parameter_hash(joiner.model), joiner.optimizer.state_dict(), joiner.epoch) == before


def test_the_parameter_hash_sees_every_value() -> None:
    model = nn.Linear(3, 2)
    before = parameter_hash(model)
    assert len(before) == 64 and before == parameter_hash(copy.deepcopy(model))
    with torch.no_grad():
        model.bias[1] = torch.nextafter(model.bias[1], torch.tensor(1.0))
    assert parameter_hash(model) != before
