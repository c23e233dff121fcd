"""Codecs for averaging parts: ``none``, ``fp16`` and ``int8`` (blockwise 8-bit quantization).

Every encoded part starts with one fixed 16-byte header, little-endian::

    version u8 | codec u8 | dtype u8 | reserved u8 (0) | numel u64 | block_size u32

followed by the body: ``numel`` values of ``dtype`` (``none``), ``numel`` float16 values (``fp16``), or one
float32 scale per block of ``block_size`` elements and then ``numel`` int8 values (``int8``). ``dtype`` is
the dtype the part decodes to. The body's exact length follows from the header, so ``decode`` checks the
header against what the receiver expects (codec, dtype, numel, block size) and the length against the
header before it allocates anything: a hostile peer cannot make a receiver allocate more than the part it
expects. The decoded values must be finite; NaN or Inf refuses the whole part.

Error bounds (x the input, x̂ the decoded value, element by element):

* ``none``: exact.
* ``fp16``: values are clamped to ±65504 (fp16's range), then rounded to nearest: |x − x̂| ≤ 2⁻¹¹·|x| for
  |x| ≥ 2⁻¹⁴, ≤ 2⁻²⁵ below (subnormals); beyond ±65504 the clamp is the error.
* ``int8``: symmetric absmax per block: scale = absmax(block)/127 (stored as float32), q = round(x/scale)
  in −127..127, x̂ = q·scale, so |x − x̂| ≤ scale/2 ≈ absmax(block)/254 (plus float32 rounding, relative
  2⁻²³ of |x|). One outlier costs precision only in its own block. Wire size: 1 byte per element plus
  4 bytes per block (≈ 25.1% of float32 at the default 4096).
"""

import abc
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from hivewire.averaging.errors import PartRejected
from hivewire.buffers import byte_buffer, empty_float_array

CODEC_VERSION = 1
HEADER = struct.Struct("<BBBBQI")
FP16_MAX = 65504.0
DEFAULT_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 2**24
_MAX_SCALE = float(np.finfo(np.float32).max) / 127  # a larger scale times 127 would overflow float32
# Elements per step of the fp16/int8 loops: temporaries stay in the CPU's cache instead of being allocated
# at the size of a 50 MB part (5-10x faster there; the very same bits).
_STEP_ELEMENTS = 2**16
# dtype code on the wire -> (torch dtype, little-endian numpy dtype)
_DTYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    1: (torch.float32, np.dtype("<f4")),
    2: (torch.float64, np.dtype("<f8")),
}
_DTYPE_CODES = {torch_dtype: code for code, (torch_dtype, _) in _DTYPES.items()}


def _dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        names = ", ".join(str(torch_dtype) for torch_dtype, _ in _DTYPES.values())
        raise ValueError(f"averaging supports {names} tensors, got {dtype}") from None


@dataclass(frozen=True)
class _Header:
    codec: int
    dtype_code: int
    numel: int
    block_size: int


class Codec(abc.ABC):
    """One compression scheme: ``encode`` a flat tensor to bytes, ``decode`` them back after checking.

    Subclasses set ``name`` and ``codec_id`` and implement the body; the header is handled here.
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]
    block_size: int = 0

    def encode(self, tensor: torch.Tensor, *, reserve: int = 0) -> memoryview:
        """Encode a 1-D float32/float64 tensor (the caller checks finiteness; NaN is refused on decode).

        ``reserve`` zero bytes come first, for the caller's own header: a whole message is then one
        allocation (buffers.byte_buffer) written in one pass, which matters at 100 MB.
        """
        if tensor.dim() != 1:
            raise ValueError(f"encode takes a flat tensor, got shape {tuple(tensor.shape)}")
        dtype_code = _dtype_code(tensor.dtype)
        numel = tensor.numel()
        out = byte_buffer(reserve + HEADER.size + self._body_bytes(numel, _DTYPES[dtype_code][1].itemsize))
        HEADER.pack_into(out, reserve, CODEC_VERSION, self.codec_id, dtype_code, 0, numel, self.block_size)
        self._encode_body(tensor.detach().cpu().contiguous(), out[reserve + HEADER.size :])
        return out

    def decode(
        self, data: bytes | bytearray | memoryview, *, expected_numel: int, expected_dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Check a part against what was expected and decode it; PartRejected says what was wrong.

        The returned tensor may share ``data``'s memory when ``data`` is writable (codec ``none`` reads
        raw values in place): the caller must not reuse it. Read-only data is copied.
        """
        view = memoryview(data).cast("B")
        header = self._check_header(view, expected_numel, expected_dtype)
        wire_dtype = _DTYPES[header.dtype_code][1]
        expected_len = HEADER.size + self._body_bytes(header.numel, wire_dtype.itemsize)
        if len(view) != expected_len:
            raise PartRejected(
                f"{self.name} part of {header.numel} elements must be {expected_len} bytes, got {len(view)}"
            )
        values = self._decode_body(view[HEADER.size :], header.numel, wire_dtype)
        if not np.isfinite(values).all():
            bad = int(np.count_nonzero(~np.isfinite(values)))
            raise PartRejected(f"{self.name} part holds {bad} non-finite value(s) (NaN or Inf) of {header.numel}")
        return torch.from_numpy(values)

    def _check_header(self, view: memoryview, expected_numel: int, expected_dtype: torch.dtype) -> _Header:
        if len(view) < HEADER.size:
            raise PartRejected(f"part shorter than its {HEADER.size}-byte header: {len(view)} bytes")
        version, codec, dtype_code, reserved, numel, block_size = HEADER.unpack_from(view)
        if version != CODEC_VERSION:
            raise PartRejected(f"part codec version must be {CODEC_VERSION}, got {version}")
        if codec != self.codec_id:
            raise PartRejected(f"part codec must be {self.codec_id} ({self.name}), got {codec}")
        if dtype_code != _dtype_code(expected_dtype):
            got = _DTYPES[dtype_code][0] if dtype_code in _DTYPES else f"unknown code {dtype_code}"
            raise PartRejected(f"part dtype must be {expected_dtype}, got {got}")
        if reserved != 0:
            raise PartRejected(f"part header reserved byte must be 0, got {reserved}")
        if numel != expected_numel:
            raise PartRejected(f"part must hold {expected_numel} elements, header says {numel}")
        if block_size != self.block_size:
            raise PartRejected(f"{self.name} part block size must be {self.block_size}, got {block_size}")
        return _Header(codec, dtype_code, numel, block_size)

    @abc.abstractmethod
    def _body_bytes(self, numel: int, itemsize: int) -> int:
        """Exact body size of ``numel`` elements whose decoded dtype has ``itemsize`` bytes."""

    @abc.abstractmethod
    def _encode_body(self, tensor: torch.Tensor, body: memoryview) -> None:
        """Write the body of ``tensor`` into ``body``, which has exactly the size _body_bytes gave."""

    @abc.abstractmethod
    def _decode_body(self, body: memoryview, numel: int, dtype: np.dtype) -> np.ndarray:
        """Decode a body whose length is already checked, into an array of ``dtype`` (a view of a writable
        body where the wire format is the array's own, a new array otherwise)."""


class NoCompression(Codec):
    """Raw little-endian values: exact, 4 bytes per float32 element."""

    name = "none"
    codec_id = 0

    def _body_bytes(self, numel: int, itemsize: int) -> int:
        return numel * itemsize

    def _encode_body(self, tensor: torch.Tensor, body: memoryview) -> None:
        values = tensor.numpy()
        np.frombuffer(body, dtype=values.dtype.newbyteorder("<"), count=values.size)[:] = values

    def _decode_body(self, body: memoryview, numel: int, dtype: np.dtype) -> np.ndarray:
        values = np.frombuffer(body, dtype=dtype, count=numel)
        return values.astype(dtype.newbyteorder("="), copy=not values.flags.writeable)  # native order: a view


class Float16Compression(Codec):
    """Half precision, clamped to fp16's finite range: 2 bytes per element, relative error ≤ 2⁻¹¹."""

    name = "fp16"
    codec_id = 1

    def _body_bytes(self, numel: int, itemsize: int) -> int:
        return numel * 2

    def _encode_body(self, tensor: torch.Tensor, body: memoryview) -> None:
        values = tensor.numpy()
        out = np.frombuffer(body, dtype="<f2", count=values.size)
        clamped = np.empty(min(_STEP_ELEMENTS, values.size), dtype=values.dtype)
        for start in range(0, values.size, _STEP_ELEMENTS):
            stop = min(start + _STEP_ELEMENTS, values.size)
            np.clip(values[start:stop], -FP16_MAX, FP16_MAX, out=clamped[: stop - start])
            out[start:stop] = clamped[: stop - start]

    def _decode_body(self, body: memoryview, numel: int, dtype: np.dtype) -> np.ndarray:
        values = empty_float_array(numel, dtype.newbyteorder("="))
        values[:] = np.frombuffer(body, dtype="<f2", count=numel)
        return values


class BlockwiseInt8Compression(Codec):
    """Symmetric 8-bit quantization with one float32 scale per block: error ≤ absmax(block)/254."""

    name = "int8"
    codec_id = 2

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be in 1..{MAX_BLOCK_SIZE}, got {block_size}")
        self.block_size = block_size

    def _blocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def _body_bytes(self, numel: int, itemsize: int) -> int:
        return 4 * self._blocks(numel) + numel

    def _steps(self, numel: int) -> Iterator[tuple[int, int, int, int]]:
        """(first block, end block, first element, end element) of each step, whole blocks per step."""
        blocks_per_step = max(1, _STEP_ELEMENTS // self.block_size)
        for first in range(0, self._blocks(numel), blocks_per_step):
            last = min(first + blocks_per_step, self._blocks(numel))
            yield first, last, first * self.block_size, min(last * self.block_size, numel)

    def _encode_body(self, tensor: torch.Tensor, body: memoryview) -> None:
        values = tensor.numpy()
        numel = values.size
        scales_out = np.frombuffer(body, dtype="<f4", count=self._blocks(numel))
        quantized_out = np.frombuffer(body, dtype=np.int8, count=numel, offset=4 * scales_out.size)
        for first, last, start, stop in self._steps(numel):
            chunk = values[start:stop].astype(np.float32, copy=False)
            padding = (last - first) * self.block_size - (stop - start)  # the last block may be short
            if padding:
                chunk = np.concatenate([chunk, np.zeros(padding, dtype=np.float32)])
            grid = chunk.reshape(last - first, self.block_size)
            scales = np.abs(grid).max(axis=1) / np.float32(127.0)
            safe = np.where(scales > 0, scales, np.float32(1.0))
            quantized = np.rint(grid / safe[:, None])  # round half to even
            np.clip(quantized, -127, 127, out=quantized)
            scales_out[first:last] = scales
            quantized_out[start:stop] = quantized.reshape(-1)[: stop - start]

    def _decode_body(self, body: memoryview, numel: int, dtype: np.dtype) -> np.ndarray:
        blocks = self._blocks(numel)
        scales = np.frombuffer(body, dtype="<f4", count=blocks)
        if not ((scales >= 0) & (scales <= _MAX_SCALE)).all():  # NaN fails both comparisons
            raise PartRejected(f"int8 part scales must be in 0..{_MAX_SCALE:g} (absmax/127); some of {blocks} are not")
        quantized = np.frombuffer(body, dtype=np.int8, count=numel, offset=4 * blocks)
        values = empty_float_array(numel, dtype.newbyteorder("="))
        for first, last, start, stop in self._steps(numel):
            chunk = quantized[start:stop].astype(np.float32)
            step_scales = np.repeat(scales[first:last].astype(np.float32), self.block_size)[: stop - start]
            values[start:stop] = chunk * step_scales  # float32 products, then the decoded dtype
        return values


CODECS: dict[str, type[Codec]] = {
    codec.name: codec for codec in (NoCompression, Float16Compression, BlockwiseInt8Compression)
}


def get_codec(name: str) -> Codec:
    """The codec a run spec names (``none``, ``fp16``, ``int8``); ValueError names the known ones."""
    try:
        return CODECS[name]()
    except KeyError:
        raise ValueError(f"unknown compression {name!r}; known: {', '.join(sorted(CODECS))}") from None
