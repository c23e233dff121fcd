"""Who reduces which slice of the flat tensor: parts proportional to each member's measured throughput.

DeDLOC's adaptive averaging: a fast member aggregates a large part, a member with throughput 0 (behind a
NAT nobody can reach, or simply slow) aggregates nothing but still sends its values to the others. Every
member must compute the same split from the same inputs without talking, so the split uses exact rational
arithmetic (``fractions.Fraction`` of the float throughputs) and breaks ties by member order: no float
rounding can differ between machines.

Proportional shares are the closed-form answer when each member's time is dominated by what it receives
and sends for its own part; hivemind solves a linear program over bandwidths instead (the anchor's
``optimize_parts_lp``), which differs only when the group is small and the speeds very uneven.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

MAX_GROUP_SIZE = 64  # the result message carries contributors as a 64-bit mask


@dataclass(frozen=True)
class Partition:
    """The split of a flat tensor of ``numel`` elements: member ``members[i]`` reduces ``slice(i)``."""

    members: tuple[str, ...]  # sorted
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def index(self, member: str) -> int:
        return self.members.index(member)

    def size(self, member: str) -> int:
        return self.sizes[self.index(member)]

    def slice(self, index: int) -> slice:
        start = sum(self.sizes[:index])
        return slice(start, start + self.sizes[index])


def plan_partition(numel: int, throughputs: Mapping[str, float]) -> Partition:
    """Split ``numel`` elements among the members (the keys) in proportion to their throughputs.

    Largest-remainder rounding: each member gets the floor of its exact share, and the elements left over
    go one each to the members with the largest remainders (ties to the earlier member in sorted order), so
    the sizes sum to ``numel`` exactly. Throughputs must be finite and >= 0, and at least one > 0.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    members = tuple(sorted(throughputs))
    if not 1 <= len(members) <= MAX_GROUP_SIZE:
        raise ValueError(f"a group has 1..{MAX_GROUP_SIZE} members, got {len(members)}")
    for member in members:
        value = throughputs[member]
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"throughput of {member} must be finite and >= 0, got {value!r}")
    exact = [Fraction(throughputs[member]) for member in members]
    total = sum(exact, Fraction(0))
    if total == 0:
        raise ValueError(f"at least one member needs a throughput > 0, got {dict(throughputs)}")
    shares = [numel * value / total for value in exact]
    sizes = [math.floor(share) for share in shares]
    leftover = numel - sum(sizes)
    by_remainder = sorted(range(len(members)), key=lambda i: (-(shares[i] - sizes[i]), i))
    for i in by_remainder[:leftover]:
        sizes[i] += 1
    return Partition(members=members, sizes=tuple(sizes))


def plan_chunks(size: int, *, target_chunks: int, min_elements: int, max_elements: int) -> tuple[int, ...]:
    """Cut a shard of ``size`` elements into the chunks the butterfly pipelines: their sizes, in order.

    About ``target_chunks`` equal chunks, none smaller than ``min_elements`` (per-message costs) nor larger
    than ``max_elements`` (the pipeline's grain), the last one possibly shorter; integer arithmetic only,
    so every member cuts the same way. An empty shard has no chunks.
    """
    if not (target_chunks >= 1 and 1 <= min_elements <= max_elements):
        raise ValueError(
            f"need target_chunks >= 1 and 1 <= min_elements <= max_elements, got "
            f"{target_chunks}, {min_elements}, {max_elements}"
        )
    if size <= 0:
        return ()
    chunk = min(max_elements, max(min_elements, -(-size // target_chunks)))
    full, rest = divmod(size, chunk)
    return (chunk,) * full + ((rest,) if rest else ())
