"""`dedloc`: accumulate gradients to the global target batch, average them, every peer takes the same step.

Equal initial parameters + the same averaged gradient + the same optimizer = equal parameters afterwards,
which `parameter_hash` lets peers check. The caller calls `step()` at the epoch boundary (when the group's
accumulated samples reach the target batch); until then it only calls `backward()`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hivewire.optim.state import check_optimizer_state, check_state
from hivewire.optim.strategy import AverageFn, Outgoing, Strategy


@dataclass(frozen=True)
class DedlocConfig:
    """Settings of the dedloc strategy."""

    clip_grad_norm: float | None = 1.0  # max L2 norm of the averaged gradient (all parameters); None: no clip


class Dedloc(Strategy):
    """Synchronous large-batch training across peers (hivemind.Optimizer's default mode)."""

    name = "dedloc"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        average: AverageFn,
        config: DedlocConfig | None = None,
    ) -> None:
        super().__init__(model, optimizer, average)
        self.config = config or DedlocConfig()

    def _before_average(self) -> Outgoing:
        # The mean gradient over this peer's samples, weighted by them: the group mean is the global batch's.
        return self._mean_gradients(), float(self.samples_accumulated)

    def _after_average(self, averaged: list[torch.Tensor]) -> None:
        for parameter, gradient in zip(self.parameters, averaged, strict=True):
            parameter.grad = gradient.to(parameter.device, copy=True)  # the network may hand back CPU tensors
        if self.config.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.parameters, self.config.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "epoch": self.epoch,
            "model": {key: value.detach().clone() for key, value in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, self.name, self.model)
        check_optimizer_state(self.optimizer, state["optimizer"], "optimizer")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # deep: torch would alias its tensors
        self.optimizer.zero_grad(set_to_none=True)
        self.samples_accumulated = 0
        self.epoch = state["epoch"]
