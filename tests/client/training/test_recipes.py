"""Recipes: the registry finds built-ins and entry points and refuses what it lacks; shards are per peer;
the built-in models learn."""

from __future__ import annotations

import logging
import textwrap
from importlib import resources
from pathlib import Path

import pytest
import torch

from hivewire.errors import HivewireError
from hivewire.optim import parameter_hash
from hivewire.recipes import (
    InvalidRecipe,
    Recipe,
    RecipeUnavailable,
    TinyClassifier,
    TinyLM,
    available,
    resolve,
    shard_seed,
)
from hivewire.recipes.corpus import generate

CPU = torch.device("cpu")


def test_registry_finds_the_built_ins() -> None:
    assert isinstance(resolve("tiny-lm", "1"), TinyLM)
    assert isinstance(resolve("tiny-classifier", "1"), TinyClassifier)
    built_ins = {(info.name, info.version) for info in available() if info.source == "built-in"}
    assert built_ins == {("tiny-lm", "1"), ("tiny-classifier", "1")}
    assert all(isinstance(recipe, Recipe) for recipe in (TinyLM(), TinyClassifier()))


def test_a_missing_recipe_says_what_to_install() -> None:
    with pytest.raises(RecipeUnavailable) as caught:
        resolve("no-such-recipe", "3")
    assert isinstance(caught.value, HivewireError)
    assert "no-such-recipe" in str(caught.value) and "tiny-lm" in str(caught.value)
    assert caught.value.advice == "Install the package that provides recipe no-such-recipe version 3."


def test_a_wrong_version_names_the_installed_one() -> None:
    with pytest.raises(RecipeUnavailable, match=r"version '2'.*1 \(built-in\)") as caught:
        resolve("tiny-lm", "2")
    assert caught.value.advice == "Install the package that provides recipe tiny-lm version 2."


@pytest.fixture
def custom_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution `hw-custom-recipe 2.0` with one good and one broken recipe entry point."""
    (tmp_path / "hw_custom_recipe.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            from hivewire.recipes import TinyClassifier

            @dataclass(frozen=True)
            class Spiral3(TinyClassifier):
                name = "custom-spiral"
                version = "2.0"
                arms: int = 3

            NOT_A_RECIPE = 42
            """
        )
    )
    dist_info = tmp_path / "hw_custom_recipe-2.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: hw-custom-recipe\nVersion: 2.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[hivewire.recipes]\n"
        "custom-spiral = hw_custom_recipe:Spiral3\n"
        "broken = hw_custom_recipe:missing\n"
        "not-a-recipe = hw_custom_recipe:NOT_A_RECIPE\n"
        "misnamed = hw_custom_recipe:Spiral3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.usefixtures("custom_distribution")
def test_an_entry_point_recipe_is_found_and_its_distribution_logged(caplog: pytest.LogCaptureFixture) -> None:
    listed = {info.name: info.source for info in available()}
    assert listed["custom-spiral"] == "hw-custom-recipe 2.0"
    with caplog.at_level(logging.INFO, logger="hivewire.recipes.registry"):
        recipe = resolve("custom-spiral", "2.0")
    batch = next(recipe.batches(1, 5, CPU))
    assert (recipe.name, recipe.version, recipe.samples_in(batch)) == ("custom-spiral", "2.0", 5)
    assert "custom recipe custom-spiral 2.0 from hw-custom-recipe 2.0" in caplog.text
    with pytest.raises(RecipeUnavailable, match=r"2\.0 \(hw-custom-recipe 2\.0\)"):
        resolve("custom-spiral", "1")


@pytest.mark.usefixtures("custom_distribution")
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("broken", r"hw-custom-recipe 2\.0 provides recipe 'broken' but loading it failed"),
        ("not-a-recipe", r"hw-custom-recipe 2\.0 registers recipe 'not-a-recipe' .* not a recipe of that name"),
        ("misnamed", r"registers recipe 'misnamed' as hw_custom_recipe:Spiral3, which is not a recipe of that name"),
    ],
)
def test_an_entry_point_that_does_not_give_its_recipe_is_named(name: str, message: str) -> None:
    with pytest.raises(InvalidRecipe, match=message):
        resolve(name, "1")


def test_the_shipped_corpus_is_the_generators_output() -> None:
    shipped = resources.files("hivewire.recipes").joinpath("data/tiny_corpus.txt").read_text()
    assert shipped == generate()
    assert 200_000 < len(shipped.encode()) < 1_000_000


@pytest.mark.parametrize("recipe", [TinyLM(), TinyClassifier()], ids=["tiny-lm", "tiny-classifier"])
def test_shards_differ_between_peers_and_repeat_for_the_same_peer(recipe: Recipe) -> None:
    def first(peer_id: str, steps: int, start_step: int = 0) -> list[torch.Tensor]:
        stream = recipe.batches(shard_seed(peer_id), 8, CPU, start_step=start_step)
        return [next(stream)[0] for _ in range(steps)]

    alice, bob = first("p-alice", 3), first("p-bob", 3)
    assert shard_seed("p-alice") != shard_seed("p-bob")
    assert all(not torch.equal(mine, theirs) for mine, theirs in zip(alice, bob, strict=True))
    assert not torch.equal(alice[0], alice[1])  # steps differ too
    assert all(torch.equal(a, b) for a, b in zip(alice, first("p-alice", 3), strict=True))
    assert torch.equal(first("p-alice", 1, start_step=2)[0], alice[2])  # random access by step


@pytest.mark.parametrize("recipe", [TinyLM(), TinyClassifier()], ids=["tiny-lm", "tiny-classifier"])
def test_the_same_seed_builds_the_same_model_without_touching_the_global_rng(recipe: Recipe) -> None:
    before = torch.random.get_rng_state()
    assert parameter_hash(recipe.build_model(7)) == parameter_hash(recipe.build_model(7))
    assert parameter_hash(recipe.build_model(7)) != parameter_hash(recipe.build_model(8))
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize(
    ("recipe", "batch_size", "steps", "ratio"),
    [(TinyLM(), 16, 60, 0.6), (TinyClassifier(), 64, 150, 0.6)],
    ids=["tiny-lm", "tiny-classifier"],
)
def test_the_loss_falls(recipe: Recipe, batch_size: int, steps: int, ratio: float) -> None:
    """Plain local training (seed 0, shard of peer "p-solo"): the mean of the last 5 losses is below
    `ratio` times the mean of the first 5."""
    model = recipe.build_model(0)
    optimizer = recipe.optimizer(model)
    stream = recipe.batches(shard_seed("p-solo"), batch_size, CPU)
    losses = []
    for _ in range(steps):
        loss = recipe.loss(model, next(stream))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < ratio * first, (first, last)
