"""`diloco`: H local AdamW steps, then average the pseudo-gradient and take an outer Nesterov SGD step.

DiLoCo (Douillard et al., 2023) communicates once per H inner steps instead of once per step, so a volunteer
on a slow link sends H× fewer bytes. Every peer keeps the *anchor* (the parameters after the last outer step,
identical across peers); its pseudo-gradient is anchor − local parameters; the outer optimizer moves the
anchor along the group's average of it, and every peer restarts its inner steps from the new anchor.
The caller calls `step()` after each inner batch; the strategy averages on every H-th call.
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
class DilocoConfig:
    """Settings of the diloco strategy; outer defaults are the DiLoCo paper's."""

    inner_steps: int = 500  # H: local optimizer steps between two averaging rounds (paper: 500)
    outer_lr: float = 0.7  # learning rate of the outer SGD step on the averaged pseudo-gradient
    outer_momentum: float = 0.9  # Nesterov momentum of the outer SGD
    clip_grad_norm: float | None = 1.0  # max L2 norm of each inner step's local gradient; None: no clip

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")


class Diloco(Strategy):
    """Local SGD with an outer Nesterov step; `optimizer` is the inner one (the recipe's AdamW)."""

    name = "diloco"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        average: AverageFn,
        config: DilocoConfig | None = None,
    ) -> None:
        super().__init__(model, optimizer, average)
        self.config = config or DilocoConfig()
        self.anchor = [parameter.detach().clone() for parameter in self.parameters]
        self.outer_optimizer = torch.optim.SGD(
            self.anchor, lr=self.config.outer_lr, momentum=self.config.outer_momentum, nesterov=True
        )
        self.inner_steps_done = 0  # inner steps since the last outer step
        self.samples_since_average = 0  # samples behind those inner steps: this peer's averaging weight

    def _before_average(self) -> Outgoing | None:
        # Inner step on the micro-batches accumulated since the last one, as a mean over their samples.
        for parameter, gradient in zip(self.parameters, self._mean_gradients(), strict=True):
            parameter.grad = gradient
        if self.config.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.parameters, self.config.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.inner_steps_done += 1
        self.samples_since_average += self.samples_accumulated
        self.samples_accumulated = 0
        if self.inner_steps_done < self.config.inner_steps:
            return None
        with torch.no_grad():
            pseudo_gradient = [anchor - p.detach() for anchor, p in zip(self.anchor, self.parameters, strict=True)]
        return pseudo_gradient, float(self.samples_since_average)

    def _after_average(self, averaged: list[torch.Tensor]) -> None:
        for anchor, pseudo_gradient in zip(self.anchor, averaged, strict=True):
            anchor.grad = pseudo_gradient.to(anchor.device, copy=True)  # the network may hand back CPU tensors
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self._reset_to_anchor()

    def _reset_to_anchor(self) -> None:
        """Restart inner steps from the anchor; the inner optimizer keeps its moments (as in DiLoCo)."""
        with torch.no_grad():
            for parameter, anchor in zip(self.parameters, self.anchor, strict=True):
                parameter.copy_(anchor)
        self.inner_steps_done = 0
        self.samples_since_average = 0

    def state_dict(self) -> dict[str, Any]:
        """The anchor (as the model's state dict), both optimizers and the epoch.

        Local parameters since the last outer step are left out on purpose: they are unaveraged local work,
        which a peer may lose (DESIGN), and a joiner that copied them would count the donor's work twice.
        """
        anchors = {id(parameter): anchor for parameter, anchor in zip(self.parameters, self.anchor, strict=True)}
        model = {
            key: anchors.get(id(value), value).detach().clone()
            for key, value in self.model.state_dict(keep_vars=True).items()
        }
        return {
            "strategy": self.name,
            "epoch": self.epoch,
            "model": model,
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "outer_optimizer": copy.deepcopy(self.outer_optimizer.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, self.name, self.model)
        check_optimizer_state(self.optimizer, state["optimizer"], "optimizer")
        check_optimizer_state(self.outer_optimizer, state.get("outer_optimizer"), "outer_optimizer")
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            for anchor, parameter in zip(self.anchor, self.parameters, strict=True):
                anchor.copy_(parameter)  # in place: the outer optimizer holds these tensors
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # deep: torch would alias its tensors
        self.outer_optimizer.load_state_dict(copy.deepcopy(state["outer_optimizer"]))
        self.optimizer.zero_grad(set_to_none=True)
        self._reset_to_anchor()
        self.samples_accumulated = 0
        self.epoch = state["epoch"]
