"""The public names of `hivewire.recipes` and `hivewire.optim`: sorted, importable, errors with advice."""

from __future__ import annotations

import inspect
from types import ModuleType

import pytest

import hivewire.optim
import hivewire.recipes
from hivewire.errors import HivewireError


@pytest.mark.parametrize("package", [hivewire.recipes, hivewire.optim], ids=["recipes", "optim"])
def test_all_is_sorted_and_every_name_exists(package: ModuleType) -> None:
    assert package.__all__ == sorted(package.__all__)
    assert all(hasattr(package, name) for name in package.__all__)


@pytest.mark.parametrize("package", [hivewire.recipes, hivewire.optim], ids=["recipes", "optim"])
def test_errors_are_hivewire_errors_with_one_sentence_of_advice(package: ModuleType) -> None:
    errors = [value for value in vars(package).values() if inspect.isclass(value) and issubclass(value, BaseException)]
    assert errors
    for error in errors:
        assert issubclass(error, HivewireError), error
        assert error.advice.endswith(".") and len(error.advice) < 120, error
