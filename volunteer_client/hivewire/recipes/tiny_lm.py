"""`tiny-lm` v1: a byte-level decoder-only transformer (nanoGPT's shape, shrunk) on the bundled corpus.

Sized to show learning on two CPU cores within a minute: 2 layers, width 64, 4 heads, context 64, 120,576
parameters; with batches of 32 the loss falls from ln 256 ≈ 5.5 to ~2.7 nats per byte in 50 steps and below
1 in 300 (measured: ~45 s on two busy cores).
No dropout: every peer must compute the same function from the same parameters.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn
from torch.nn import functional as F

from hivewire.recipes.base import batch_generator

LMBatch = tuple[torch.Tensor, torch.Tensor]


@functools.cache
def corpus_bytes() -> torch.Tensor:
    """The shipped corpus as a uint8 tensor, read once per process."""
    data = resources.files("hivewire.recipes").joinpath("data/tiny_corpus.txt").read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP, each with a residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_attention = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.projection = nn.Linear(width, width)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_attention(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.ln_mlp(x))


class TinyGPT(nn.Module):
    """Token + position embeddings, blocks, final norm, and a head tied to the token embedding (fewer bytes)."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        blocks = [Block(width, heads) for _ in range(layers)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight
        for name, parameter in self.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:
                nn.init.normal_(parameter, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(parameter)
        # GPT-2's scaling of residual projections, so the residual stream does not grow with depth.
        for block in blocks:
            nn.init.normal_(block.projection.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))


@dataclass(frozen=True)
class TinyLM:
    """The `tiny-lm` recipe; its fields are fixed by the version (change them, bump the version)."""

    name = "tiny-lm"
    version = "1"
    context: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    learning_rate: float = 3e-3
    weight_decay: float = 0.01

    def build_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return TinyGPT(256, self.context, self.width, self.layers, self.heads)

    def batches(self, shard_seed: int, batch_size: int, device: torch.device, start_step: int = 0) -> Iterator[LMBatch]:
        data = corpus_bytes()
        step = start_step
        while True:
            starts = torch.randint(len(data) - self.context, (batch_size,), generator=batch_generator(shard_seed, step))
            windows = torch.stack([data[start : start + self.context + 1] for start in starts.tolist()]).long()
            yield windows[:, :-1].to(device), windows[:, 1:].to(device)
            step += 1

    def loss(self, model: nn.Module, batch: LMBatch) -> torch.Tensor:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def samples_in(self, batch: LMBatch) -> int:
        return int(batch[0].shape[0])

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
