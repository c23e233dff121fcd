"""What a recipe is (model + data + loss), and the rule that gives each volunteer its own data shard.

Shard rule: a peer's shard seed is the first 8 bytes (big-endian) of SHA-256("hivewire-shard\\0" + peer id);
the batch a peer draws at data step `s` (its micro-batch counter, starting at 0) is sampled with a
`torch.Generator` seeded by the first 8 bytes of SHA-256(shard seed ‖ s). So the same peer id and step
give the same batch on any machine, and two peers' streams coincide only if SHA-256 collides on 64 bits.
SHA-256 rather than `hash()`: Python salts string hashes per process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Recipe(Protocol):
    """A versioned model + data + loss; built-ins ship with the client, custom ones are entry points.

    Batches may be any object the recipe's own `loss` and `samples_in` understand.
    """

    @property
    def name(self) -> str:
        """The name a run spec uses, e.g. `tiny-lm`."""

    @property
    def version(self) -> str:
        """Changes whenever model, data or loss change, so peers never mix incompatible training."""

    def build_model(self, seed: int) -> nn.Module:
        """The initial model; the same seed gives bit-identical parameters (every dedloc peer must start equal)."""

    def batches(self, shard_seed: int, batch_size: int, device: torch.device, start_step: int = 0) -> Iterator[Any]:
        """Endless batches of this shard from data step `start_step` on (see `batch_generator`)."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss over the batch, a scalar the strategies scale by `samples_in(batch)`."""

    def samples_in(self, batch: Any) -> int:
        """How many samples the batch holds: the unit of target batch size and of averaging weights."""

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The (inner) optimizer with this recipe's hyperparameters; every peer builds the same one."""


def _sha64(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def shard_seed(peer_id: str) -> int:
    """The 64-bit seed of this peer's data shard (see the module docstring for the rule)."""
    return _sha64(b"hivewire-shard\0" + peer_id.encode())


def batch_generator(shard_seed: int, step: int) -> torch.Generator:
    """The generator a recipe samples batch `step` of the shard with: random access, so a restart can resume."""
    if not 0 <= shard_seed < 2**64 or step < 0:
        raise ValueError(f"expected 0 <= shard_seed < 2**64 and step >= 0, got {shard_seed} and {step}")
    generator = torch.Generator()
    generator.manual_seed(_sha64(shard_seed.to_bytes(8, "big") + step.to_bytes(8, "big")))
    return generator
