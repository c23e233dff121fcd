"""An in-process stand-in for the group all-reduce: the exact weighted mean of what every member passed.

Simulated peers run as coroutines on one event loop; each awaits `average` until all members contributed.
`bytes_sent` counts what members hand to the callable, i.e. what the network would have to carry.
"""

from __future__ import annotations

import asyncio

import torch


class MeanGroup:
    """A fixed group of `size` members averaging round after round."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rounds = 0
        self.bytes_sent = 0
        self._pending: list[tuple[list[torch.Tensor], float, asyncio.Future[list[torch.Tensor]]]] = []

    async def average(self, tensors: list[torch.Tensor], weight: float) -> list[torch.Tensor]:
        self.bytes_sent += sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        result: asyncio.Future[list[torch.Tensor]] = asyncio.get_running_loop().create_future()
        self._pending.append(([tensor.clone() for tensor in tensors], weight, result))
        if len(self._pending) == self.size:
            members, self._pending = self._pending, []
            total = sum(weight for _, weight, _ in members)
            mean = [
                torch.stack([sent[index] * (weight / total) for sent, weight, _ in members]).sum(dim=0)
                for index in range(len(tensors))
            ]
            for _, _, future in members:
                future.set_result([tensor.clone() for tensor in mean])
            self.rounds += 1
        return await result
