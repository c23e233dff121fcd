"""Recipes: what a run trains (model + data + loss). Built-ins ship here; custom ones are entry points.

The server only names a recipe and version; this package resolves the name locally and refuses what it lacks.
"""

from hivewire.recipes.base import Recipe, batch_generator, shard_seed
from hivewire.recipes.errors import InvalidRecipe, RecipeError, RecipeUnavailable
from hivewire.recipes.registry import GROUP, RecipeInfo, available, resolve
from hivewire.recipes.tiny_classifier import TinyClassifier
from hivewire.recipes.tiny_lm import TinyLM

__all__ = [
    "GROUP",
    "InvalidRecipe",
    "Recipe",
    "RecipeError",
    "RecipeInfo",
    "RecipeUnavailable",
    "TinyClassifier",
    "TinyLM",
    "available",
    "batch_generator",
    "resolve",
    "shard_seed",
]
