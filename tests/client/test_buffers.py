"""The buffer pool: memory is reused only once nothing refers to it, handed out zeroed, and bounded."""

import gc

import numpy as np
import pytest
import torch

from hivewire import buffers

SIZE = 3 * buffers.MIN_POOLED_BYTES + 5  # pooled, and no multiple of anything


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with a pool of its own, so other tests' freed buffers do not count."""
    monkeypatch.setattr(buffers, "_POOL", buffers._Pool())


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def test_a_freed_buffer_is_reused_zeroed_for_the_same_size() -> None:
    first = buffers.byte_buffer(SIZE)
    first[:] = b"\xff" * SIZE
    address = _address(first)
    del first
    gc.collect()
    assert buffers.idle_bytes() == SIZE
    second = buffers.byte_buffer(SIZE)
    assert _address(second) == address and buffers.idle_bytes() == 0
    assert second.format == "B" and len(second) == SIZE and not second.readonly
    assert bytes(second) == bytes(SIZE), "a reused buffer comes back zeroed"
    other_size = buffers.byte_buffer(SIZE + 1)
    assert _address(other_size) != address


@pytest.mark.parametrize(
    "derive",
    [
        lambda view: view[10:20],  # a slice of the memoryview
        lambda view: np.frombuffer(view, dtype=np.uint8)[5:].view(np.int16),  # numpy views collapse their base
        lambda view: torch.from_numpy(np.frombuffer(view, dtype=np.float32, count=100)[3:]),
        lambda view: memoryview(view).cast("B")[1:],
    ],
    ids=["slice", "numpy-view", "torch-tensor", "recast"],
)
def test_memory_is_not_reused_while_anything_made_from_the_buffer_lives(derive) -> None:
    view = buffers.byte_buffer(SIZE)
    derived = derive(view)
    address = _address(view)
    del view
    gc.collect()
    assert buffers.idle_bytes() == 0
    again = buffers.byte_buffer(SIZE)
    assert _address(again) != address, "handed out while still in use"
    del derived
    gc.collect()
    assert buffers.idle_bytes() == SIZE


def test_float_arrays_come_from_the_pool_and_small_buffers_do_not() -> None:
    array = buffers.empty_float_array(buffers.MIN_POOLED_BYTES, np.float32)
    assert array.dtype == np.float32 and array.shape == (buffers.MIN_POOLED_BYTES,) and array.flags.writeable
    array[:] = 7.0
    del array
    small = buffers.byte_buffer(buffers.MIN_POOLED_BYTES - 1)
    tiny = buffers.empty_float_array(3, np.float64)
    assert tiny.shape == (3,)
    del small, tiny
    gc.collect()
    assert buffers.idle_bytes() == 4 * buffers.MIN_POOLED_BYTES
    assert bytes(buffers.byte_buffer(4 * buffers.MIN_POOLED_BYTES)) == bytes(4 * buffers.MIN_POOLED_BYTES)


def test_idle_memory_is_bounded_dropping_the_least_recently_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffers, "MAX_IDLE_BYTES", 2 * SIZE + 1)
    held = [buffers.byte_buffer(SIZE + i) for i in range(3)]
    for _ in range(3):
        del held[0]  # freed in order: SIZE, SIZE + 1, SIZE + 2
    gc.collect()
    assert buffers.idle_bytes() == SIZE + 2  # over the bound: SIZE went first, then SIZE + 1
    fresh = buffers.byte_buffer(SIZE)  # not from the pool: its block was dropped
    assert buffers.idle_bytes() == SIZE + 2 and len(fresh) == SIZE
