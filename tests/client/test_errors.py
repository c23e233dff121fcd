"""The exceptions module: its public names, its hierarchy, and advice a volunteer can act on."""

from __future__ import annotations

import inspect

from hivewire import errors


def exception_classes() -> list[type[errors.HivewireError]]:
    return [
        value for value in vars(errors).values() if inspect.isclass(value) and issubclass(value, errors.HivewireError)
    ]


def test_all_is_sorted_and_complete() -> None:
    assert errors.__all__ == sorted(errors.__all__)
    assert set(errors.__all__) == {cls.__name__ for cls in exception_classes()}


def test_every_exception_is_drawn_in_the_docstring() -> None:
    assert errors.__doc__ is not None
    for cls in exception_classes():
        assert cls.__name__ in errors.__doc__


def test_every_exception_carries_one_sentence_of_advice() -> None:
    for cls in exception_classes():
        assert cls.advice.endswith("."), cls
        assert len(cls.advice) < 120, cls


def test_advice_can_be_overridden_per_instance() -> None:
    error = errors.ConfigError("bad", advice="Do this instead.")
    assert (str(error), error.advice) == ("bad", "Do this instead.")
    assert errors.ConfigError("bad").advice == errors.ConfigError.advice


def test_banned_is_forbidden() -> None:
    assert issubclass(errors.Banned, errors.Forbidden)
    assert issubclass(errors.Forbidden, errors.APIError)
