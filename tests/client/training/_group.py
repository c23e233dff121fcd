"""An in-process stand-in for the group all-reduce: the exact weighted mean of what every member passed.

Simulated peers run as coroutines on one event loop; each awaits `average` until all members contributed, or
submits with `start` and collects the result later (diloco's overlap), behind an optional gate.
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
        self.gate: asyncio.Event | None = None  # set: rounds started beside computation wait for it
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

    def start(self, tensors: list[torch.Tensor], weight: float) -> HeldRound:
        """Submit without waiting (diloco's overlap): the round runs as a task until `result()` is awaited."""
        task = asyncio.get_running_loop().create_task(self._after(self.gate, tensors, weight))
        return HeldRound(task)

    async def _after(
        self, gate: asyncio.Event | None, tensors: list[torch.Tensor], weight: float
    ) -> list[torch.Tensor]:
        if gate is not None:
            await gate.wait()
        return await self.average(tensors, weight)


class HeldRound:
    """A round in flight, as `NetworkHandle.start_average` leaves it; `result()` is awaited at the next boundary."""

    def __init__(self, task: asyncio.Task[list[torch.Tensor]]) -> None:
        self.task = task

    def done(self) -> bool:
        return self.task.done()

    async def result(self) -> list[torch.Tensor] | None:
        return await self.task
