"""Parameter hashes for divergence checks, and checks on tensors and states that arrive from other peers.

The averaged tensors and a late joiner's state come from the network, so they are checked for count,
shape, dtype and finiteness before anything is changed (DESIGN: every input from the network is hostile).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hivewire.optim.errors import AveragedTensorsRejected, StateRejected


def parameter_hash(model: nn.Module) -> str:
    """SHA-256 (hex) over every state-dict entry's name, shape and little-endian fp32 bytes, in order."""
    return state_hash(model.state_dict())


def state_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """`parameter_hash` of a state dict (e.g. `Strategy.agreed_state()`, which may differ from the model's).

    Why fp32 and names: peers compare hashes across machines, so the bytes must not depend on the device, the
    storage dtype's platform layout or a reshape that keeps the numbers.
    """
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(f"{name}:{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()


def check_averaged(sent: Sequence[torch.Tensor], received: Sequence[torch.Tensor]) -> None:
    """Raise `AveragedTensorsRejected` unless `received` matches `sent` tensor by tensor and is finite."""
    if len(received) != len(sent):
        raise AveragedTensorsRejected(f"averaging returned {len(received)} tensors, expected {len(sent)}")
    for index, (mine, theirs) in enumerate(zip(sent, received, strict=True)):
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            got = f"{tuple(theirs.shape)} {theirs.dtype}" if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise AveragedTensorsRejected(
                f"averaged tensor {index}: expected {tuple(mine.shape)} {mine.dtype}, got {got}"
            )
        if not torch.isfinite(theirs).all():
            raise AveragedTensorsRejected(f"averaged tensor {index} holds NaN or infinity")


def check_state(state: Mapping[str, Any], strategy: str, model: nn.Module) -> None:
    """Raise `StateRejected` unless `state` is this strategy's and its model tensors fit `model`, finite."""
    if state.get("strategy") != strategy:
        raise StateRejected(f"state is for strategy {state.get('strategy')!r}, this peer runs {strategy!r}")
    epoch = state.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise StateRejected(f"state epoch must be an integer >= 0, got {epoch!r}")
    expected = model.state_dict()
    tensors = state.get("model")
    if not isinstance(tensors, Mapping) or set(tensors) != set(expected):
        raise StateRejected("state model entries differ from this model's (another recipe or version?)")
    for name, mine in expected.items():
        theirs = tensors[name]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            raise StateRejected(f"state model entry {name}: expected {tuple(mine.shape)} {mine.dtype}")
        if theirs.is_floating_point() and not torch.isfinite(theirs).all():
            raise StateRejected(f"state model entry {name} holds NaN or infinity")


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, what: str) -> None:
    """Raise `StateRejected` unless `state` fits `optimizer`'s groups and parameter shapes and is finite.

    Checked here rather than left to torch, which accepts per-parameter tensors of any shape and fails only
    at the next step, after the model was already replaced.
    """
    if not isinstance(state, Mapping) or not isinstance(state.get("state"), Mapping):
        raise StateRejected(f"state {what} is not an optimizer state dict")
    groups = state.get("param_groups")
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if not isinstance(groups, list) or [len(group.get("params", ())) for group in groups] != sizes:
        raise StateRejected(f"state {what}: parameter groups differ from this optimizer's {sizes}")
    shapes = [parameter.shape for group in optimizer.param_groups for parameter in group["params"]]
    for index, slots in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(shapes) or not isinstance(slots, Mapping):
            raise StateRejected(f"state {what}: unexpected entry for parameter {index!r}")
        for slot, value in slots.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() > 0 and value.shape != shapes[index]:
                raise StateRejected(f"state {what}: {slot} of parameter {index} is not {tuple(shapes[index])}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise StateRejected(f"state {what}: {slot} of parameter {index} holds NaN or infinity")
