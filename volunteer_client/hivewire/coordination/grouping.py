"""Which peers average together in a round: a pure function of (peers, group size, round).

Every peer computes the groups from its own gossiped view; equal views give equal groups without a leader
or a message. The rule (docs/protocol.md, "Groups"):

* one group when the run has at most ``group_size`` peers;
* otherwise ``k = ceil(n / group_size)`` groups with sizes that differ by at most one: peers are ordered by
  ``blake2b(round, peer id)`` and dealt out in consecutive runs of ``n // k`` or ``n // k + 1``.

The hash order changes with the round, so groups are reshuffled every round (Moshpit-style regrouping):
within a few rounds every peer has averaged, directly or through others, with every other, and repeated
small-group averaging converges to the global average (Moshpit SGD, Ryabinin et al., 2021). A peer id is
derived from a key hash, so no one can pick where it lands.
"""

import hashlib
import math
from collections.abc import Collection


def _order_key(round_number: int, peer: str) -> bytes:
    return hashlib.blake2b(f"hivewire-group-v1\n{round_number}\n{peer}".encode(), digest_size=16).digest()


def form_groups(peers: Collection[str], *, group_size: int, round_number: int) -> list[tuple[str, ...]]:
    """Every group of the round, each a sorted tuple; groups listed by their first member."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    unique = sorted(set(peers))
    if not unique:
        return []
    count = math.ceil(len(unique) / group_size)
    ordered = sorted(unique, key=lambda peer: _order_key(round_number, peer))
    base, larger = divmod(len(ordered), count)
    groups, start = [], 0
    for index in range(count):
        size = base + (1 if index < larger else 0)
        groups.append(tuple(sorted(ordered[start : start + size])))
        start += size
    return sorted(groups)


def group_of(peer: str, peers: Collection[str], *, group_size: int, round_number: int) -> tuple[str, ...]:
    """The group ``peer`` belongs to in this round (``peer`` is counted even if ``peers`` lacks it)."""
    groups = form_groups({*peers, peer}, group_size=group_size, round_number=round_number)
    return next(group for group in groups if peer in group)
