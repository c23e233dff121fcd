"""`diloco`: H local AdamW steps, then average the pseudo-gradient and take an outer Nesterov SGD step.

DiLoCo (Douillard et al., 2023) communicates once per H inner steps instead of once per step, so a volunteer
on a slow link sends H× fewer bytes. Every peer keeps the *anchor* (the parameters after the last outer step,
identical across peers); its pseudo-gradient is anchor − local parameters; the outer optimizer moves the
anchor along the group's average of it, and every peer restarts its inner steps from the new anchor.
The caller calls `step()` after each inner batch; the strategy averages on every H-th call.

With `overlap` the outer step lands one round late (Streaming DiLoCo; docs/training.md, "Averaging beside
computation"): round k−1 moves the anchor as soon as its answer is there (at the latest at the end of window k),
then the strategy submits round k (this window's movement g_k) without waiting and goes on from the new anchor minus
g_k, so the volunteer computes while the group averages. Anchors stay identical across peers; the update is one
window stale. A round that did not happen stands in with g_k alone, so no local work is lost.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hivewire.optim.errors import AveragedTensorsRejected
from hivewire.optim.state import check_averaged, check_optimizer_state, check_state
from hivewire.optim.strategy import AverageFn, Outgoing, Pending, StartFn, Strategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DilocoConfig:
    """Settings of the diloco strategy; outer defaults are the DiLoCo paper's."""

    inner_steps: int = 500  # H: local optimizer steps between two averaging rounds (paper: 500)
    outer_lr: float = 0.7  # learning rate of the outer SGD step on the averaged pseudo-gradient
    outer_momentum: float = 0.9  # Nesterov momentum of the outer SGD
    clip_grad_norm: float | None = 1.0  # max L2 norm of each inner step's local gradient; None: no clip
    overlap: bool = False  # average beside computation: `average` is a StartFn, the outer step one round late

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
        average: AverageFn | StartFn,
        config: DilocoConfig | None = None,
    ) -> None:
        super().__init__(model, optimizer, average)  # type: ignore[arg-type]  # a StartFn with overlap
        self.config = config or DilocoConfig()
        self.anchor = [parameter.detach().clone() for parameter in self.parameters]
        self.outer_optimizer = torch.optim.SGD(
            self.anchor, lr=self.config.outer_lr, momentum=self.config.outer_momentum, nesterov=True
        )
        self.inner_steps_done = 0  # inner steps since the last outer step
        self.samples_since_average = 0  # samples behind those inner steps: this peer's averaging weight
        # overlap: the round in flight and the movement it carries (g_k); the window started at anchor − g_k
        self._pending: Pending | None = None
        self._sent: list[torch.Tensor] | None = None

    @property
    def rounds_in_flight(self) -> int:
        return 0 if self._pending is None else 1

    def step(self) -> None:
        if not self.config.overlap:
            return super().step()
        outgoing = self._before_average()
        if self._pending is not None and (outgoing is not None or self._pending.done()):
            averaged = self._pending.result()
            if inspect.isawaitable(averaged):
                if inspect.iscoroutine(averaged):
                    averaged.close()
                raise TypeError("the round's result is async: call `await strategy.astep()` instead of step()")
            self._apply_late(averaged)
        if outgoing is not None:
            self._submit(outgoing)

    async def astep(self) -> None:
        if not self.config.overlap:
            return await super().astep()
        outgoing = self._before_average()
        if self._pending is not None and (outgoing is not None or self._pending.done()):
            averaged = self._pending.result()
            if inspect.isawaitable(averaged):
                averaged = await averaged
            self._apply_late(averaged)
        if outgoing is not None:
            self._submit(outgoing)

    def finish(self) -> None:
        """Collect the round in flight and apply it, then stand on the anchor (leaving: the final model)."""
        if self._pending is not None:
            averaged = self._pending.result()
            if inspect.isawaitable(averaged):
                if inspect.iscoroutine(averaged):
                    averaged.close()
                raise TypeError("the round's result is async: call `await strategy.afinish()` instead")
            self._apply_late(averaged)
        self._reset_to_anchor()

    async def afinish(self) -> None:
        """`finish` for an async round."""
        if self._pending is not None:
            averaged = self._pending.result()
            if inspect.isawaitable(averaged):
                averaged = await averaged
            self._apply_late(averaged)
        self._reset_to_anchor()

    def abandon(self) -> None:
        """Drop the round in flight without applying it (the network failed): stand on the agreed anchor."""
        if self._pending is not None:
            logger.warning("epoch %d: abandoned the round in flight; its window's local work is lost", self.epoch)
        self._reset_to_anchor()

    def _apply_late(self, averaged: list[torch.Tensor] | None) -> None:
        """Round k−1's average (or, without one, our own g_{k−1}) moves the anchor, and the local parameters along.

        Applied as soon as the answer is there, mid-window, rather than at the boundary: the same numbers (the
        window then starts from the new anchor − g_{k−1}), but every member enters epoch k when the round
        ends, as without overlap, so the next round's matchmaking sees them all at it, and a joiner downloads
        the newest anchor."""
        if self._pending is None:
            return  # the first window since the start or a state load: nothing in flight
        assert self._sent is not None
        sent, self._pending = self._sent, None
        if averaged is not None:
            try:
                check_averaged(sent, averaged)  # from the network: checked before anything changes
            except AveragedTensorsRejected as exc:
                logger.warning("epoch %d: %s; the local movement stands in for the round", self.epoch, exc)
                averaged = None
        with torch.no_grad():
            before = [anchor.clone() for anchor in self.anchor]
            for anchor, pseudo_gradient in zip(self.anchor, averaged if averaged is not None else sent, strict=True):
                anchor.grad = pseudo_gradient.to(anchor.device, copy=True)
            self.outer_optimizer.step()
            self.outer_optimizer.zero_grad(set_to_none=True)
            for parameter, anchor, old in zip(self.parameters, self.anchor, before, strict=True):
                parameter.add_(anchor - old)
        self.epoch += 1

    def _submit(self, outgoing: Outgoing) -> None:
        """Steps 2 and 3: send g_k without waiting, go on from the new anchor minus g_k."""
        movement, weight = outgoing
        self._pending = self.average(movement, weight)  # type: ignore[assignment]  # a StartFn with overlap
        self._sent = movement
        with torch.no_grad():
            for parameter, anchor, moved in zip(self.parameters, self.anchor, movement, strict=True):
                parameter.copy_(anchor).sub_(moved)
        self.inner_steps_done = 0
        self.samples_since_average = 0

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
            start = self.anchor if self._sent is None else [a - g for a, g in zip(self.anchor, self._sent, strict=True)]
            pseudo_gradient = [s - p.detach() for s, p in zip(start, self.parameters, strict=True)]
        return pseudo_gradient, float(self.samples_since_average)

    def _after_average(self, averaged: list[torch.Tensor]) -> None:
        for anchor, pseudo_gradient in zip(self.anchor, averaged, strict=True):
            anchor.grad = pseudo_gradient.to(anchor.device, copy=True)  # the network may hand back CPU tensors
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        self._reset_to_anchor()

    def _reset_to_anchor(self) -> None:
        """Restart inner steps from the anchor; the inner optimizer keeps its moments (as in DiLoCo)."""
        self._pending, self._sent = None, None
        with torch.no_grad():
            for parameter, anchor in zip(self.parameters, self.anchor, strict=True):
                parameter.copy_(anchor)
        self.inner_steps_done = 0
        self.samples_since_average = 0

    def agreed_state(self) -> dict[str, torch.Tensor]:
        """The anchor as the model's state dict: with overlap the model itself holds anchor − g_k + local work."""
        anchors = {id(parameter): anchor for parameter, anchor in zip(self.parameters, self.anchor, strict=True)}
        return {
            key: anchors.get(id(value), value).detach() for key, value in self.model.state_dict(keep_vars=True).items()
        }

    def state_dict(self) -> dict[str, Any]:
        """The anchor (as the model's state dict), both optimizers and the epoch.

        Local parameters since the last outer step are left out on purpose: they are unaveraged local work,
        which a peer may lose (DESIGN), and a joiner that copied them would count the donor's work twice. With
        overlap the round in flight is left out too: the joiner was not in it, and starts a window of its own
        from the anchor every peer holds at this epoch.
        """
        model = {key: value.clone() for key, value in self.agreed_state().items()}
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
