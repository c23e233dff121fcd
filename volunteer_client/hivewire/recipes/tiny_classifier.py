"""`tiny-classifier` v1: an MLP that tells apart the arms of a 2-D spiral, generated on the fly.

Spirals rather than blobs because a linear model cannot separate them, so the loss curve shows the hidden
layers learning. The spiral's shape is fixed by the version; only which points are drawn depends on the shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hivewire.recipes.base import batch_generator

ClassifierBatch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TinyClassifier:
    """The `tiny-classifier` recipe: `arms` classes, one per spiral arm, with Gaussian noise on the points."""

    name = "tiny-classifier"
    version = "1"
    arms: int = 4
    turns: float = 1.0
    noise: float = 0.05
    hidden: int = 64
    learning_rate: float = 1e-2
    weight_decay: float = 0.0

    def build_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(
                nn.Linear(2, self.hidden),
                nn.ReLU(),
                nn.Linear(self.hidden, self.hidden),
                nn.ReLU(),
                nn.Linear(self.hidden, self.arms),
            )

    def batches(
        self, shard_seed: int, batch_size: int, device: torch.device, start_step: int = 0
    ) -> Iterator[ClassifierBatch]:
        step = start_step
        while True:
            generator = batch_generator(shard_seed, step)
            labels = torch.randint(self.arms, (batch_size,), generator=generator)
            radius = torch.rand(batch_size, generator=generator)
            angle = labels * (2 * math.pi / self.arms) + radius * (2 * math.pi * self.turns)
            points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
            points = points + self.noise * torch.randn(batch_size, 2, generator=generator)
            yield points.to(device), labels.to(device)
            step += 1

    def loss(self, model: nn.Module, batch: ClassifierBatch) -> torch.Tensor:
        points, labels = batch
        return F.cross_entropy(model(points), labels)

    def samples_in(self, batch: ClassifierBatch) -> int:
        return int(batch[0].shape[0])

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
