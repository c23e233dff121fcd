"""NetworkHandle's rounds beside computation, over a real Pipe whose other end the test answers as the network
process would: the shared buffer in, `Average` out, training free until the answer is collected."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest
import torch

from hivewire.session.handle import NetworkHandle, RoundSkipped
from hivewire.session.messages import Average, Averaged


@pytest.fixture
def pair() -> Iterator[tuple[NetworkHandle, Connection]]:
    ours, theirs = multiprocessing.Pipe()
    handle = NetworkHandle.__new__(NetworkHandle)
    handle._attach(ours, torch.zeros(6), multiprocessing.current_process())
    yield handle, theirs
    ours.close()
    theirs.close()


def answer(buffer: torch.Tensor, epoch: int, values: list[float] | None) -> Averaged:
    """What the network process does at a round's end: the result into the buffer, then `Averaged`."""
    if values is None:
        return Averaged(epoch, False, ("me",), {}, 0.0, "no group")
    buffer.copy_(torch.tensor(values))
    return Averaged(epoch, True, ("me", "them"), {}, 1.0, weight=4.0, bytes_sent=24)


def test_start_returns_at_once_and_finish_collects_the_answer(pair: tuple[NetworkHandle, Connection]) -> None:
    handle, network = pair
    tensors = [torch.ones(2, 2), torch.full((2,), 2.0)]
    handle.start_average(3, tensors, 4.0)
    request = network.recv()
    assert request == Average(3, 4.0) and torch.equal(handle.buffer, torch.tensor([1.0, 1, 1, 1, 2, 2]))
    assert handle.round_in_flight == 3 and not handle.answered(3)
    network.send(answer(handle.buffer, 3, [0.5, 0.5, 0.5, 0.5, 1, 1]))
    handle.poll()  # between micro-batches: the answer is taken in, nothing waits
    assert handle.answered(3)
    averaged = handle.finish_average(3)
    assert [tuple(t.shape) for t in averaged] == [(2, 2), (2,)]
    assert torch.equal(averaged[0], torch.full((2, 2), 0.5)) and torch.equal(averaged[1], torch.ones(2))
    assert handle.round_in_flight is None and handle.last_round is not None and handle.last_round.ok


def test_a_round_without_a_group_is_skipped(pair: tuple[NetworkHandle, Connection]) -> None:
    handle, network = pair
    handle.start_average(0, [torch.ones(6)], 1.0)
    network.recv()
    network.send(answer(handle.buffer, 0, None))
    with pytest.raises(RoundSkipped, match="no group"):
        handle.finish_average(0)
    assert handle.round_in_flight is None


def test_one_round_at_a_time(pair: tuple[NetworkHandle, Connection]) -> None:
    handle, _ = pair
    handle.start_average(0, [torch.ones(6)], 1.0)
    with pytest.raises(RuntimeError, match="still in flight"):
        handle.start_average(1, [torch.ones(6)], 1.0)
    with pytest.raises(RuntimeError, match="no round of epoch 1"):
        handle.finish_average(1)


def test_an_abandoned_rounds_answer_is_dropped_before_the_buffer_is_reused(
    pair: tuple[NetworkHandle, Connection],
) -> None:
    """After a downloaded state the round in flight is abandoned; its late answer must neither be taken for the
    next round's nor be overwritten by it: the next start waits for it, then fills the buffer."""
    handle, network = pair
    handle.start_average(2, [torch.ones(6)], 1.0)
    network.recv()
    handle.abandon_average()
    network.send(answer(handle.buffer, 2, [9.0] * 6))
    handle.start_average(2, [torch.full((6,), 3.0)], 1.0)  # the same epoch again, as after a reload
    assert network.recv() == Average(2, 1.0) and torch.equal(handle.buffer, torch.full((6,), 3.0))
    assert not handle.answered(2)
    network.send(answer(handle.buffer, 2, [4.0] * 6))
    assert torch.equal(handle.finish_average(2)[0], torch.full((6,), 4.0))
