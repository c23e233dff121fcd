"""Large buffers that are cheap to fill, for payloads and averaging.

A fresh 50 MB buffer costs page faults as it is first written: ~12,000 with 4 KiB pages, a few dozen where
the kernel has transparent huge pages ready (numpy asks for them). On the 2-core test machine filling a
fresh 50 MB bytearray took 34-45 ms, a fresh numpy buffer 5-11 ms when huge pages were free and up to 100 ms
when they were not; filling memory already touched took 3.5 ms. A 100 MB averaging round allocates several
such buffers on every member (received payloads, encoded messages, the mean, the result), each round the
same sizes, so buffers of at least ``MIN_POOLED_BYTES`` come from a pool: once nothing refers to a buffer any
more (its memoryview, numpy arrays and torch tensors over it are all gone), its memory is kept for the next
buffer of the same size, up to ``MAX_IDLE_BYTES`` in all. Reuse is safe by construction: memory goes back only
when Python has dropped the last reference to it.
"""

import ctypes
import threading
import weakref
from collections import OrderedDict

import numpy as np

MIN_POOLED_BYTES = 2**20  # smaller ones come from malloc, which reuses them itself
MAX_IDLE_BYTES = 2**30  # idle memory the pool keeps; the least recently freed goes first


class _Pool:
    def __init__(self) -> None:
        self._idle: OrderedDict[int, list[np.ndarray]] = OrderedDict()  # size -> blocks, least recent first
        self._idle_bytes = 0
        self._lock = threading.Lock()  # finalizers run in whichever thread dropped the last reference

    def take(self, size: int) -> np.ndarray | None:
        with self._lock:
            blocks = self._idle.get(size)
            if not blocks:
                return None
            block = blocks.pop()
            if not blocks:
                del self._idle[size]
            self._idle_bytes -= size
            return block

    def give_back(self, block: np.ndarray) -> None:
        size = block.nbytes
        with self._lock:
            self._idle.setdefault(size, []).append(block)
            self._idle.move_to_end(size)
            self._idle_bytes += size
            while self._idle_bytes > MAX_IDLE_BYTES:
                oldest, blocks = next(iter(self._idle.items()))
                blocks.pop(0)
                self._idle_bytes -= oldest
                if not blocks:
                    del self._idle[oldest]

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes


_POOL = _Pool()


def idle_bytes() -> int:
    """Memory the pool holds for reuse (for tests and diagnostics)."""
    return _POOL.idle_bytes


def _anchor(size: int, *, zeroed: bool) -> ctypes.Array[ctypes.c_uint8]:
    """``size`` bytes in an object every view of them refers to: numpy collapses a view's ``base`` to the
    array owning the memory, so an ndarray could die while views of it live on; a ctypes array is opaque to
    numpy, and it alone refers to the pooled block. Once it dies the block is free for the next buffer."""
    block = _POOL.take(size)
    if block is None:
        block = np.zeros(size, dtype=np.uint8)
    elif zeroed:
        block.fill(0)
    anchor = (ctypes.c_uint8 * size).from_buffer(block)
    weakref.finalize(anchor, _POOL.give_back, block)
    return anchor


def byte_buffer(size: int) -> memoryview:
    """``size`` zero bytes, writable, one-dimensional (format ``B``); large ones reuse freed memory."""
    if size < MIN_POOLED_BYTES:
        return memoryview(np.zeros(size, dtype=np.uint8))
    return memoryview(_anchor(size, zeroed=True)).cast("B")


def empty_float_array(numel: int, dtype: np.dtype | type) -> np.ndarray:
    """A 1-D array of ``numel`` uninitialised values of ``dtype`` (float32 or float64), from the same pool:
    for results the caller writes in full (a reused block still holds an earlier round's values)."""
    dtype = np.dtype(dtype)
    size = numel * dtype.itemsize
    if size < MIN_POOLED_BYTES:
        return np.empty(numel, dtype=dtype)
    return np.frombuffer(memoryview(_anchor(size, zeroed=False)).cast("B"), dtype=dtype)
