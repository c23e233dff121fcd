"""Errors of recipe resolution; the CLI prints the message and the advice, then refuses to join.

HivewireError (hivewire.errors)
└── RecipeError           base of this package's errors
    ├── RecipeUnavailable   no installed recipe has the run's name and version
    └── InvalidRecipe       an installed package claims the recipe but does not load as one
"""

from __future__ import annotations

from hivewire.errors import HivewireError


class RecipeError(HivewireError):
    """Base of the errors raised while finding the recipe a run names."""


class RecipeUnavailable(RecipeError):
    """The run names a recipe (or a version of it) this client does not have; the server never ships code."""

    def __init__(self, message: str, *, name: str, version: str) -> None:
        super().__init__(message, advice=f"Install the package that provides recipe {name} version {version}.")
        self.name = name
        self.version = version


class InvalidRecipe(RecipeError):
    """An entry point in group `hivewire.recipes` failed to import or did not give a recipe."""

    advice = "Reinstall or update the package named above, or uninstall it if you do not need it."
