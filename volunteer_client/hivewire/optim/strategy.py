"""What dedloc and diloco share: sample-weighted backward, the injected averaging call, and checks on its result.

The all-reduce is injected as `average(tensors, weight) -> tensors`, sync or async, which must return the
weighted mean over the group of what each member passed (weight = the samples behind the member's tensors).
Keeping the network behind one callable lets the trainer stay a plain loop, and lets tests average in process.
A strategy that averages beside computation (diloco with `overlap`) takes `start(tensors, weight) -> Pending`
instead: the round is submitted at once and its `result()` collected one window later.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from hivewire.optim.state import check_averaged

AverageFn = Callable[[list[torch.Tensor], float], list[torch.Tensor] | Awaitable[list[torch.Tensor]]]
Outgoing = tuple[list[torch.Tensor], float]


class Pending(Protocol):
    """A round submitted beside computation; `result()` blocks (or is awaited) until the group answered."""

    def done(self) -> bool:
        """Whether the answer is there, so `result()` would not wait."""
        ...

    def result(self) -> list[torch.Tensor] | Awaitable[list[torch.Tensor] | None] | None:
        """The group's weighted mean, or None when the round did not happen (the caller logged why)."""
        ...


StartFn = Callable[[list[torch.Tensor], float], Pending]


class Strategy(ABC):
    """One peer's side of collaborative training: call `backward` per micro-batch, `step`/`astep` per step."""

    name: ClassVar[str]

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, average: AverageFn) -> None:
        self.model = model
        self.optimizer = optimizer
        self.average = average
        self.parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        self.epoch = 0  # averaging rounds completed: the global epoch this peer's parameters belong to
        self.samples_accumulated = 0  # local samples behind the gradients or updates not yet averaged

    def backward(self, loss: torch.Tensor, samples: int) -> None:
        """Accumulate gradients of a micro-batch's mean `loss`, weighted by its `samples`.

        Why weight: the gradients become a sum over samples, so micro-batches and peers of different sizes
        count in proportion to their data, exactly as in one large batch.
        """
        if samples <= 0:
            raise ValueError(f"a micro-batch must hold at least one sample, got {samples}")
        (loss * samples).backward()
        self.samples_accumulated += samples

    def step(self) -> None:
        """Take this strategy's step; averages through a sync callable when a round is due."""
        outgoing = self._before_average()
        if outgoing is None:
            return
        averaged = self.average(*outgoing)
        if inspect.isawaitable(averaged):
            if inspect.iscoroutine(averaged):
                averaged.close()  # never awaited: close it so no "never awaited" warning leaks
            raise TypeError("the averaging callable is async: call `await strategy.astep()` instead of step()")
        self._finish(outgoing[0], averaged)

    async def astep(self) -> None:
        """Take this strategy's step; averages through a sync or async callable when a round is due."""
        outgoing = self._before_average()
        if outgoing is None:
            return
        averaged = self.average(*outgoing)
        if inspect.isawaitable(averaged):
            averaged = await averaged
        self._finish(outgoing[0], averaged)

    @property
    def rounds_in_flight(self) -> int:
        """Rounds submitted but not applied yet (0 unless the strategy averages beside computation)."""
        return 0

    def agreed_state(self) -> dict[str, torch.Tensor]:
        """The model tensors every peer of the group holds alike (views, not copies): what peers hash and compare."""
        return self.model.state_dict()

    def _finish(self, sent: list[torch.Tensor], averaged: list[torch.Tensor]) -> None:
        check_averaged(sent, averaged)  # from the network: checked before anything changes
        with torch.no_grad():
            self._after_average(averaged)
        self.samples_accumulated = 0
        self.epoch += 1

    def _mean_gradients(self) -> list[torch.Tensor]:
        """Accumulated gradients divided by the samples behind them (zeros for unused parameters)."""
        samples = max(self.samples_accumulated, 1)
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach() / samples for p in self.parameters]

    @abstractmethod
    def _before_average(self) -> Outgoing | None:
        """Local work of a step; the tensors and weight to average, or None when no round is due."""

    @abstractmethod
    def _after_average(self, averaged: list[torch.Tensor]) -> None:
        """Apply the group's average (already checked); runs under no_grad."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """A snapshot (copies) of what a late joiner needs: model, optimizer state(s), epoch."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check, then load a snapshot; unaveraged local work is dropped."""
