"""Framing proves: payloads of any size round-trip with their checksum, and every malformed, out-of-order,
duplicate, oversize or truncated frame raises FramingError without touching other payloads."""

import os
import tracemalloc

import pytest

from hivewire.mesh import FramingError, FramingLimits, PayloadDecoder, encode_payload
from hivewire.mesh.framing import (
    DEFAULT_REMOTE_MESSAGE_BYTES,
    FRAMING_VERSION,
    HEADER,
    KIND_CHUNK,
    KIND_START,
    MAX_MESSAGE_BYTES,
    max_message_bytes_from_sdp,
)

FRAME = 1024  # small frames keep these tests fast and exercise many chunks


def frames(payload_id: int, data: bytes, frame_bytes: int = FRAME) -> list[bytes]:
    return list(encode_payload(payload_id, data, frame_bytes))


def decoder(**limits: int) -> PayloadDecoder:
    return PayloadDecoder(FramingLimits(max_frame_bytes=FRAME, **limits), peer="test-peer")


def feed_all(dec: PayloadDecoder, items: list[bytes]) -> tuple[int, bytearray] | None:
    result = None
    for frame in items:
        result = dec.feed(frame)
    return result


@pytest.mark.parametrize("size", [0, 1, FRAME - HEADER.size, FRAME - HEADER.size + 1, 10 * FRAME + 7])
def test_payload_round_trips_at_chunk_boundaries(size: int) -> None:
    data = os.urandom(size)
    dec = decoder()
    items = frames(1, data)
    assert all(len(frame) <= FRAME for frame in items)
    assert feed_all(dec, items) == (1, bytearray(data))
    assert dec.held == 1
    dec.release()
    assert dec.held == 0


def test_frames_never_exceed_the_negotiated_message_size() -> None:
    items = frames(1, os.urandom(3 * MAX_MESSAGE_BYTES), MAX_MESSAGE_BYTES)
    assert max(len(frame) for frame in items) == MAX_MESSAGE_BYTES


def test_oversize_declaration_is_refused_before_allocation() -> None:
    dec = decoder(max_payload_bytes=2**20)
    start = frames(1, b"x")[0]
    huge = HEADER.pack(FRAMING_VERSION, KIND_START, 0, 1, 2**40) + start[HEADER.size :]
    tracemalloc.start()
    try:
        with pytest.raises(FramingError, match="declares 1099511627776 bytes, the limit is 1048576") as info:
            dec.feed(huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    assert info.value.payload_id == 1
    assert dec.held == 0
    assert feed_all(dec, frames(1, b"ok")) == (1, bytearray(b"ok")), "a refused START must not use up its id"


def _header(version: int = FRAMING_VERSION, kind: int = KIND_CHUNK, reserved: int = 0, pid: int = 1) -> bytes:
    return HEADER.pack(version, kind, reserved, pid, 0)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"", "truncated frame of 0 bytes"),
        (_header()[:-1], "truncated frame of 19 bytes"),
        (_header(version=2) + b"x", "framing version 2, this side speaks 1"),
        (_header(reserved=1) + b"x", "reserved header field is 1"),
        (_header(kind=9) + b"x", "unknown frame kind 9"),
        (_header(kind=KIND_START) + b"short", "expected a 32-byte digest"),
        (_header(pid=77) + b"x", "chunk for payload 77, which is not in progress"),
        (b"\x01" * (FRAME + 1), f"frame of {FRAME + 1} bytes exceeds the limit of {FRAME}"),
        ("text", "expected a binary frame, got str"),
    ],
)
def test_malformed_frames_are_refused_and_change_nothing(frame: bytes, message: str) -> None:
    dec = decoder()
    data = os.urandom(5 * FRAME)
    items = frames(1, data)
    dec.feed(items[0])
    dec.feed(items[1])
    with pytest.raises(FramingError, match=message) as info:
        dec.feed(frame)  # type: ignore[arg-type]
    assert info.value.payload_id is None
    assert feed_all(dec, items[2:]) == (1, bytearray(data)), "the payload in progress is unaffected"


def test_bad_chunk_discards_its_payload_only() -> None:
    dec = decoder()
    first, second = os.urandom(4 * FRAME), os.urandom(4 * FRAME)
    one, two = frames(1, first), frames(2, second)
    dec.feed(one[0])
    dec.feed(two[0])
    dec.feed(one[1])
    dec.feed(two[1])
    with pytest.raises(FramingError, match="offset 0, expected") as info:
        dec.feed(one[1])  # duplicate chunk
    assert info.value.payload_id == 1
    with pytest.raises(FramingError, match="payload 1, which is not in progress"):
        dec.feed(one[2])
    assert feed_all(dec, two[2:]) == (2, bytearray(second))


def test_out_of_order_chunk_is_refused() -> None:
    dec = decoder()
    items = frames(1, os.urandom(4 * FRAME))
    dec.feed(items[0])
    with pytest.raises(FramingError, match="out of order"):
        dec.feed(items[2])
    assert dec.held == 0


def test_chunk_beyond_declared_size_is_refused() -> None:
    dec = decoder()
    items = frames(1, os.urandom(10))
    dec.feed(items[0])
    with pytest.raises(FramingError, match="overruns the declared size"):
        dec.feed(HEADER.pack(FRAMING_VERSION, KIND_CHUNK, 0, 1, 0) + b"y" * 11)


def test_empty_chunk_is_refused() -> None:
    dec = decoder()
    dec.feed(frames(1, b"abc")[0])
    with pytest.raises(FramingError, match="empty chunk"):
        dec.feed(HEADER.pack(FRAMING_VERSION, KIND_CHUNK, 0, 1, 0))


def test_corrupted_chunk_fails_the_checksum() -> None:
    dec = decoder()
    data = os.urandom(3 * FRAME)
    items = frames(1, data)
    corrupted = bytearray(items[2])
    corrupted[-1] ^= 0x01
    items[2] = bytes(corrupted)
    with pytest.raises(FramingError, match="SHA-256 of the 3072 bytes") as info:
        feed_all(dec, items)
    assert info.value.payload_id == 1
    assert dec.held == 0
    assert feed_all(dec, frames(2, data)) == (2, bytearray(data))


def test_duplicate_or_replayed_payload_id_is_refused() -> None:
    dec = decoder()
    feed_all(dec, frames(5, b"first"))
    for replayed in (5, 3):
        with pytest.raises(FramingError, match=f"payload id {replayed} is a duplicate or replay"):
            dec.feed(frames(replayed, b"again")[0])
    assert dec.held == 1


def test_number_of_payloads_held_is_bounded() -> None:
    dec = decoder(max_incoming_payloads=2)
    feed_all(dec, frames(1, b"delivered, not released"))
    dec.feed(frames(2, b"in progress")[0])
    with pytest.raises(FramingError, match="already holding 2 payloads") as info:
        dec.feed(frames(3, b"one too many")[0])
    assert info.value.payload_id == 3
    dec.release()
    assert feed_all(dec, frames(4, b"fits again")) == (4, bytearray(b"fits again"))


def test_discard_all_drops_partial_payloads() -> None:
    dec = decoder()
    dec.feed(frames(1, os.urandom(3 * FRAME))[0])
    assert dec.discard_all() == 1
    assert dec.held == 0
    with pytest.raises(RuntimeError):
        dec.release()


@pytest.mark.parametrize(("payload_id", "frame_bytes"), [(0, FRAME), (2**64, FRAME), (1, HEADER.size), (1, 2**20)])
def test_encoder_refuses_invalid_arguments(payload_id: int, frame_bytes: int) -> None:
    with pytest.raises(ValueError, match="must be in"):
        frames(payload_id, b"x", frame_bytes)


@pytest.mark.parametrize(
    ("sdp", "expected"),
    [
        ("v=0\r\na=max-message-size:262144\r\n", MAX_MESSAGE_BYTES),
        ("v=0\r\na=max-message-size:1000000\r\n", MAX_MESSAGE_BYTES),
        ("v=0\r\na=max-message-size:100000\r\n", 100_000),
        ("v=0\r\na=max-message-size:0\r\n", MAX_MESSAGE_BYTES),
        ("v=0\r\n", DEFAULT_REMOTE_MESSAGE_BYTES),
        ("v=0\r\na=max-message-size:-5\r\n", DEFAULT_REMOTE_MESSAGE_BYTES),
    ],
)
def test_max_message_size_follows_the_remote_sdp(sdp: str, expected: int) -> None:
    assert max_message_bytes_from_sdp(sdp) == expected
