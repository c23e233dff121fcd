"""The split of a tensor among group members: proportional, exact, the same on every member."""

import math
from fractions import Fraction

import pytest

from hivewire.averaging import plan_partition
from hivewire.averaging.partition import MAX_GROUP_SIZE


def test_parts_are_proportional_to_throughput_and_sum_exactly() -> None:
    throughputs = {"c": 30.0, "a": 10.0, "b": 20.5}
    partition = plan_partition(1_000_003, throughputs)
    assert partition.members == ("a", "b", "c")
    assert partition.numel == 1_000_003
    total = sum(Fraction(value) for value in throughputs.values())
    for member, size in zip(partition.members, partition.sizes, strict=True):
        share = 1_000_003 * Fraction(throughputs[member]) / total
        assert abs(size - share) < 1  # largest remainder: never more than one element off its exact share


def test_slices_tile_the_tensor() -> None:
    partition = plan_partition(101, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert [partition.slice(i) for i in range(3)] == [slice(0, 34), slice(34, 68), slice(68, 101)]
    assert partition.sizes == (34, 34, 33)  # the tie goes to the earlier member, on every machine


def test_split_does_not_depend_on_the_order_members_are_listed_in() -> None:
    forward = {f"peer-{i}": 1.0 + i / 7 for i in range(10)}
    backward = dict(reversed(list(forward.items())))
    assert plan_partition(12345, forward) == plan_partition(12345, backward)


def test_member_with_zero_throughput_reduces_nothing() -> None:
    partition = plan_partition(10, {"a": 0.0, "b": 3.0, "c": 3.0})
    assert partition.sizes == (0, 5, 5)
    assert partition.size("a") == 0
    assert plan_partition(7, {"a": 0.0, "b": 1e-300}).sizes == (0, 7)


def test_tiny_tensors_and_many_members() -> None:
    partition = plan_partition(3, {f"m{i:02d}": 1.0 for i in range(MAX_GROUP_SIZE)})
    assert sum(partition.sizes) == 3 and max(partition.sizes) == 1
    assert plan_partition(0, {"a": 1.0, "b": 2.0}).sizes == (0, 0)


@pytest.mark.parametrize(
    ("numel", "throughputs", "message"),
    [
        (10, {"a": 0.0, "b": 0.0}, "at least one member"),
        (10, {"a": -1.0, "b": 1.0}, "finite and >= 0"),
        (10, {"a": math.nan, "b": 1.0}, "finite and >= 0"),
        (10, {"a": math.inf}, "finite and >= 0"),
        (10, {}, "1..64 members"),
        (10, {f"m{i}": 1.0 for i in range(MAX_GROUP_SIZE + 1)}, "1..64 members"),
        (-1, {"a": 1.0}, "numel"),
    ],
)
def test_invalid_inputs_are_refused(numel: int, throughputs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_partition(numel, throughputs)
