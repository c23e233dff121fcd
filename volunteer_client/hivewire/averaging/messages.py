"""The two averaging messages and their checks: a PART (stage 1) and a RESULT (stage 2), one per chunk.

Each message is one 36-byte header, little-endian, followed by an encoded chunk (compression.py)::

    magic "HWAV" | version u8 | kind u8 | shard u16 | round_tag 8 bytes | weight f64 | contributors u64
    | chunk u32

* PART (kind 1): a member's values for one chunk of the shard it sends to that shard's reducer; ``weight``
  is the member's sample count, ``contributors`` is 0.
* RESULT (kind 2): a reducer's weighted mean of one chunk of its shard; ``weight`` is the total weight
  used, ``contributors`` the bit mask (bit i = sorted member i) of whose parts went into it.

``chunk`` is the chunk's index within its shard (partition.plan_chunks cuts shards into chunks); a sender
sends each kind's chunks in index order, so a receiver expects exactly the next one.

``round_tag`` (8 bytes of BLAKE2b of the round id) tells this round's messages from a late one of an earlier
round on the same link.
"""

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

from hivewire.averaging.compression import Codec
from hivewire.averaging.errors import PartRejected

MAGIC = b"HWAV"
MESSAGE_VERSION = 2  # 1 had no chunk field: one message per shard
HEADER = struct.Struct("<4sBBH8sdQI")
KIND_PART = 1
KIND_RESULT = 2
_KIND_NAMES = {KIND_PART: "PART", KIND_RESULT: "RESULT"}


def round_tag(round_id: str) -> bytes:
    """The 8-byte tag of a round id, as carried in every message of that round."""
    return hashlib.blake2b(round_id.encode(), digest_size=8).digest()


@dataclass(frozen=True)
class Message:
    """A parsed header and the still-encoded part that follows it (decoded only once checked)."""

    kind: int
    shard: int
    tag: bytes
    weight: float
    contributors: int
    chunk: int
    body: memoryview


def encode_message(
    kind: int,
    *,
    shard: int,
    chunk: int,
    tag: bytes,
    weight: float,
    contributors: int,
    codec: Codec,
    values: torch.Tensor,
) -> memoryview:
    """One message: this header, then ``values`` encoded by ``codec``, in a single buffer."""
    data = codec.encode(values, reserve=HEADER.size)
    HEADER.pack_into(data, 0, MAGIC, MESSAGE_VERSION, kind, shard, tag, weight, contributors, chunk)
    return data


def parse_message(data: bytes | bytearray | memoryview, *, group_size: int, max_weight: float) -> Message:
    """Check the header of a message in a group of ``group_size``; PartRejected says what was wrong.

    ``max_weight`` bounds a member's weight (sample count); a RESULT's total may reach group_size times it.

    What depends on the round (tag, shard, expected size) is checked by the caller, which knows it.
    """
    view = memoryview(data).cast("B")
    if len(view) < HEADER.size:
        raise PartRejected(f"message shorter than its {HEADER.size}-byte header: {len(view)} bytes")
    magic, version, kind, shard, tag, weight, contributors, chunk = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise PartRejected(f"message must start with {MAGIC!r}, got {bytes(magic)!r}")
    if version != MESSAGE_VERSION:
        raise PartRejected(f"message version must be {MESSAGE_VERSION}, got {version}")
    if kind not in _KIND_NAMES:
        raise PartRejected(f"message kind must be one of {sorted(_KIND_NAMES)}, got {kind}")
    limit = max_weight if kind == KIND_PART else max_weight * group_size  # a RESULT carries the total
    if not (math.isfinite(weight) and 0 <= weight <= limit):
        raise PartRejected(f"{_KIND_NAMES[kind]} weight must be finite and in 0..{limit:g}, got {weight!r}")
    if shard >= group_size:
        raise PartRejected(f"{_KIND_NAMES[kind]} shard must be < group size {group_size}, got {shard}")
    if kind == KIND_PART and contributors != 0:
        raise PartRejected(f"PART contributors field must be 0, got {contributors:#x}")
    if contributors >> group_size:
        raise PartRejected(f"RESULT contributors {contributors:#x} name members beyond the group of {group_size}")
    return Message(kind, shard, bytes(tag), weight, contributors, chunk, view[HEADER.size :])


def kind_name(kind: int) -> str:
    return _KIND_NAMES[kind]
