"""Errors of the optimizer strategies; each leaves the model, the optimizer and the epoch unchanged.

HivewireError (hivewire.errors)
└── StrategyError             base of this package's errors
    ├── AveragedTensorsRejected   the averaging callable returned tensors that do not fit what was sent
    └── StateRejected             a downloaded training state does not fit this model or strategy
"""

from __future__ import annotations

from hivewire.errors import HivewireError


class StrategyError(HivewireError):
    """Base of the errors an optimizer strategy raises on purpose."""


class AveragedTensorsRejected(StrategyError):
    """The averaging round returned the wrong count, shape or dtype, or non-finite values; no step was taken."""

    advice = "The round was discarded and local work kept; if this repeats, a group member sends bad data."


class StateRejected(StrategyError):
    """A training state (e.g. from a neighbour, for a late joiner) failed a check; nothing was loaded."""

    advice = "Download the state from another neighbour, or check that every peer runs the same recipe version."
