"""Find the recipe a run names: built-ins first, then entry points in group `hivewire.recipes`.

An entry point's name is the recipe name and it loads to a recipe object (or to a zero-argument callable
returning one, e.g. a class); its `version` attribute is matched against the run's. Entry points are code the
volunteer installed knowingly, so they are imported only when a run asks for their name, and the distribution
and version that provided the recipe are logged. Built-ins take precedence over an entry point of the same
name and version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata

from hivewire.recipes.base import Recipe
from hivewire.recipes.errors import InvalidRecipe, RecipeUnavailable
from hivewire.recipes.tiny_classifier import TinyClassifier
from hivewire.recipes.tiny_lm import TinyLM

logger = logging.getLogger(__name__)
GROUP = "hivewire.recipes"
BUILT_INS: tuple[Recipe, ...] = (TinyLM(), TinyClassifier())


@dataclass(frozen=True)
class RecipeInfo:
    """One recipe a client can train, as listed by `available()`; `source` is "built-in" or "dist x.y"."""

    name: str
    version: str | None  # None for an entry point: its version is known only once it is imported
    source: str


def _source(entry_point: metadata.EntryPoint) -> str:
    dist = entry_point.dist
    return f"{dist.name} {dist.version}" if dist is not None else f"module {entry_point.module}"


def available() -> list[RecipeInfo]:
    """Built-ins and installed entry points, without importing any custom code."""
    infos = [RecipeInfo(recipe.name, recipe.version, "built-in") for recipe in BUILT_INS]
    infos += [RecipeInfo(ep.name, None, _source(ep)) for ep in metadata.entry_points(group=GROUP)]
    return infos


def _load(entry_point: metadata.EntryPoint) -> Recipe:
    """Import one entry point and check that it gives a recipe of the name it is registered under."""
    source = _source(entry_point)
    try:
        recipe = entry_point.load()
        if isinstance(recipe, type) or (callable(recipe) and not isinstance(recipe, Recipe)):
            recipe = recipe()  # a class or factory (a class passes the protocol check, so test for it first)
    except Exception as error:
        raise InvalidRecipe(f"{source} provides recipe {entry_point.name!r} but loading it failed: {error}") from error
    if not isinstance(recipe, Recipe) or recipe.name != entry_point.name:
        raise InvalidRecipe(
            f"{source} registers recipe {entry_point.name!r} as {entry_point.value}, which is not a recipe of "
            "that name (expected name, version, build_model, batches, loss, samples_in, optimizer)"
        )
    return recipe


def resolve(name: str, version: str) -> Recipe:
    """The installed recipe with this name and version, or `RecipeUnavailable` saying what is installed."""
    found: list[str] = []
    for recipe in BUILT_INS:
        if recipe.name == name:
            if recipe.version == version:
                return recipe
            found.append(f"{recipe.version} (built-in)")
    for entry_point in metadata.entry_points(group=GROUP, name=name):
        recipe = _load(entry_point)
        if recipe.version == version:
            logger.info("using custom recipe %s %s from %s", name, version, _source(entry_point))
            return recipe
        found.append(f"{recipe.version} ({_source(entry_point)})")
    if found:
        message = f"the run needs recipe {name!r} version {version!r}; this client has version {', '.join(found)}"
    else:
        installed = ", ".join(f"{info.name} ({info.source})" for info in available())
        message = f"the run needs recipe {name!r} version {version!r}; this client has no such recipe ({installed})"
    raise RecipeUnavailable(message, name=name, version=version)
