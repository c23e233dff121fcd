"""Codecs: round trips within the documented error, and decode refusing anything it was not told to expect."""

import random
import struct

import numpy as np
import pytest
import torch

from hivewire.averaging import (
    BlockwiseInt8Compression,
    Codec,
    Float16Compression,
    NoCompression,
    PartRejected,
    get_codec,
)
from hivewire.averaging.compression import FP16_MAX, HEADER

CODECS: list[Codec] = [NoCompression(), Float16Compression(), BlockwiseInt8Compression(), BlockwiseInt8Compression(7)]


def sample(numel: int = 10_000, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=generator) * torch.logspace(-3, 3, numel)  # six decades of magnitude
    return values[torch.randperm(numel, generator=generator)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_none_is_exact(dtype: torch.dtype) -> None:
    values = sample().to(dtype)
    decoded = NoCompression().decode(
        NoCompression().encode(values), expected_numel=values.numel(), expected_dtype=dtype
    )
    assert decoded.dtype == dtype
    assert torch.equal(decoded, values)


def test_fp16_error_is_within_its_bound_and_clamps_to_its_range() -> None:
    values = torch.cat([sample(), torch.tensor([1e6, -1e6, 65504.0, 1e-9])])
    codec = Float16Compression()
    data = codec.encode(values)
    assert len(data) == HEADER.size + 2 * values.numel()
    decoded = codec.decode(data, expected_numel=values.numel())
    clamped = values.clamp(-FP16_MAX, FP16_MAX)
    bound = torch.maximum(clamped.abs() * 2.0**-11, torch.full_like(clamped, 2.0**-25))
    assert ((decoded - clamped).abs() <= bound).all()
    assert decoded[-4:-1].tolist() == [FP16_MAX, -FP16_MAX, FP16_MAX]


@pytest.mark.parametrize("block_size", [1, 7, 4096])
def test_int8_error_is_within_half_a_step_of_each_block(block_size: int) -> None:
    values = sample(20_001)
    codec = BlockwiseInt8Compression(block_size)
    data = codec.encode(values)
    blocks = -(-values.numel() // block_size)
    assert len(data) == HEADER.size + 4 * blocks + values.numel()
    decoded = codec.decode(data, expected_numel=values.numel())
    padded = torch.nn.functional.pad(values, (0, blocks * block_size - values.numel()))
    absmax = padded.view(blocks, block_size).abs().amax(dim=1)
    bound = (absmax / 254 * (1 + 2.0**-20)).repeat_interleave(block_size)[: values.numel()] + values.abs() * 2.0**-23
    assert ((decoded - values).abs() <= bound).all()


def test_int8_outlier_costs_precision_in_its_own_block_only() -> None:
    values = torch.randn(8192, generator=torch.Generator().manual_seed(1))
    values[5] = 1e4
    error = (
        BlockwiseInt8Compression(4096).decode(BlockwiseInt8Compression(4096).encode(values), expected_numel=8192)
        - values
    ).abs()
    assert error[4096:].max() <= values[4096:].abs().max() / 254 < 0.1
    assert error[:4096].max() > 1.0


def test_int8_all_zero_block_decodes_to_zero() -> None:
    values = torch.zeros(10)
    assert torch.equal(
        BlockwiseInt8Compression(4).decode(BlockwiseInt8Compression(4).encode(values), expected_numel=10), values
    )


def test_decoded_raw_part_views_writable_data_and_everything_else_is_a_copy() -> None:
    """Codec none reads a writable part in place (no copy of 50 MB parts); read-only data and the lossy
    codecs' output never share memory with the message."""
    values = sample(100)
    for codec in CODECS:
        data = bytearray(codec.encode(values))
        from_bytes = codec.decode(bytes(data), expected_numel=100)
        decoded = codec.decode(data, expected_numel=100)
        assert torch.equal(decoded, from_bytes)
        data[HEADER.size :] = bytes(len(data) - HEADER.size)
        assert torch.equal(from_bytes, codec.decode(codec.encode(values), expected_numel=100))
        if codec.name == "none":
            assert torch.equal(decoded, torch.zeros(100))
        else:
            assert torch.equal(decoded, from_bytes)


def _nan_part(codec: Codec) -> bytes:
    if isinstance(codec, BlockwiseInt8Compression):
        data = bytearray(codec.encode(torch.ones(10)))
        struct.pack_into("<f", data, HEADER.size, float("nan"))  # the first block's scale
        return bytes(data)
    data = bytearray(NoCompression().encode(torch.ones(10)) if codec.name == "none" else codec.encode(torch.ones(10)))
    fmt = "<f" if codec.name == "none" else "<e"
    struct.pack_into(fmt, data, HEADER.size + 3 * struct.calcsize(fmt), float("inf"))
    return bytes(data)


@pytest.mark.parametrize("codec", CODECS, ids=lambda codec: f"{codec.name}-{codec.block_size}")
def test_decode_refuses_what_was_not_expected(codec: Codec) -> None:
    good = bytes(codec.encode(torch.ones(10)))
    other = Float16Compression() if codec.name != "fp16" else NoCompression()
    f32 = torch.float32
    cases: list[tuple[str, bytes | bytearray, int, torch.dtype]] = [
        ("shorter than", good[:5], 10, f32),
        ("must be", good[:-1], 10, f32),
        ("must be", good + b"\0", 10, f32),
        ("must hold 11 elements", good, 11, f32),
        ("dtype must be torch.float64", good, 10, torch.float64),
        ("codec must be", other.encode(torch.ones(10)), 10, f32),
        ("version must be", bytes([9]) + good[1:], 10, f32),
        ("reserved byte", good[:3] + b"\1" + good[4:], 10, f32),
        ("non-finite|scales must be in", _nan_part(codec), 10, f32),
    ]
    for expected_error, data, numel, dtype in cases:
        with pytest.raises(PartRejected, match=expected_error):
            codec.decode(data, expected_numel=numel, expected_dtype=dtype)


def test_lying_header_is_refused_before_allocation() -> None:
    """A header claiming 2⁶⁰ elements or a block size of 2³² would need exabytes if it were believed."""
    codec = BlockwiseInt8Compression()
    huge = HEADER.pack(1, codec.codec_id, 1, 0, 2**60, 4096) + b"\0" * 64
    with pytest.raises(PartRejected, match="must hold 10 elements"):
        codec.decode(huge, expected_numel=10)
    with pytest.raises(PartRejected, match="must be"):
        codec.decode(huge, expected_numel=2**60)  # even when told to expect it: the length is checked first
    odd_block = HEADER.pack(1, codec.codec_id, 1, 0, 10, 2**32 - 1) + b"\0" * 14
    with pytest.raises(PartRejected, match="block size must be 4096"):
        codec.decode(odd_block, expected_numel=10)


@pytest.mark.parametrize("codec", CODECS, ids=lambda codec: f"{codec.name}-{codec.block_size}")
def test_fuzzed_parts_raise_part_rejected_or_decode_to_the_expected_size(codec: Codec) -> None:
    rng = random.Random(1234)
    good = bytes(codec.encode(sample(300)))
    for _ in range(3000):
        choice = rng.randrange(4)
        if choice == 0:
            data = rng.randbytes(rng.randrange(0, 2 * len(good)))
        elif choice == 1:
            data = good[: rng.randrange(len(good))]
        else:
            mutated = bytearray(good)
            for _ in range(rng.randrange(1, 8)):
                position = rng.randrange(HEADER.size + 8 if choice == 2 else len(mutated))  # header, or anywhere
                mutated[position] = rng.randrange(256)
            data = bytes(mutated)
        try:
            decoded = codec.decode(data, expected_numel=300)
        except PartRejected:
            continue
        assert decoded.shape == (300,) and decoded.dtype == torch.float32
        assert bool(torch.isfinite(decoded).all())


def test_decode_accepts_bytes_bytearray_and_memoryview() -> None:
    data = NoCompression().encode(torch.arange(4.0))
    for buffer in (data, bytearray(data), memoryview(data)):
        assert NoCompression().decode(buffer, expected_numel=4).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_encode_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(ValueError, match="flat tensor"):
        NoCompression().encode(torch.ones(2, 2))
    with pytest.raises(ValueError, match="supports"):
        NoCompression().encode(torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="block_size"):
        BlockwiseInt8Compression(0)


def test_get_codec_names_the_known_ones() -> None:
    assert [get_codec(name).name for name in ("none", "fp16", "int8")] == ["none", "fp16", "int8"]
    with pytest.raises(ValueError, match="known: fp16, int8, none"):
        get_codec("zstd")


def test_wire_format_is_little_endian_and_versioned() -> None:
    data = BlockwiseInt8Compression(2).encode(torch.tensor([1.0, -2.0, 0.5]))
    assert HEADER.unpack_from(data) == (1, 2, 1, 0, 3, 2)
    scales = np.frombuffer(data, dtype="<f4", count=2, offset=HEADER.size)
    assert scales.tolist() == pytest.approx([2.0 / 127, 0.5 / 127])
