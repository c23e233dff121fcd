"""The grouping rule: every peer computes the same bounded, balanced groups, and rounds mix the run."""

from __future__ import annotations

import random

import pytest

from hivewire.coordination import form_groups, group_of, round_id

PEERS = [f"peer-{index:03d}" for index in range(64)]


@pytest.mark.parametrize(("count", "group_size"), [(1, 4), (4, 4), (5, 4), (17, 4), (64, 8), (63, 8), (10, 16)])
def test_groups_are_a_partition_bounded_and_balanced(count: int, group_size: int) -> None:
    peers = PEERS[:count]
    groups = form_groups(peers, group_size=group_size, round_number=7)
    assert sorted(peer for group in groups for peer in group) == sorted(peers)
    sizes = [len(group) for group in groups]
    assert max(sizes) <= group_size
    assert max(sizes) - min(sizes) <= 1
    assert len(groups) == -(-count // group_size)  # as few groups as the bound allows
    assert all(list(group) == sorted(group) for group in groups)


def test_the_same_view_gives_the_same_groups_on_every_peer() -> None:
    expected = form_groups(PEERS, group_size=8, round_number=3)
    shuffled = random.Random(1).sample(PEERS, len(PEERS))
    assert form_groups(shuffled + shuffled[:5], group_size=8, round_number=3) == expected
    for peer in PEERS:
        assert group_of(peer, shuffled, group_size=8, round_number=3) in expected


def test_a_run_smaller_than_a_group_is_one_group() -> None:
    assert form_groups(PEERS[:5], group_size=8, round_number=9) == [tuple(PEERS[:5])]
    assert form_groups([], group_size=8, round_number=0) == []
    assert group_of("alone", [], group_size=8, round_number=0) == ("alone",)
    with pytest.raises(ValueError, match="group_size"):
        form_groups(PEERS, group_size=0, round_number=0)


def test_rounds_regroup_so_that_everyone_mixes() -> None:
    """Moshpit-style: after a few rounds each peer met more than its first group, and averages reach everyone."""
    rounds = [form_groups(PEERS, group_size=8, round_number=number) for number in range(4)]
    assert len({tuple(groups) for groups in rounds}) == len(rounds)  # each round groups differently
    met: dict[str, set[str]] = {peer: set() for peer in PEERS}
    for groups in rounds:
        for group in groups:
            for peer in group:
                met[peer].update(group)
    first = {peer: set(group_of(peer, PEERS, group_size=8, round_number=0)) for peer in PEERS}
    assert all(met[peer] > first[peer] for peer in PEERS)
    # Whose values a peer's parameters hold after rounds 0..2: every peer's, once the groups chain up.
    reach = {peer: {peer} for peer in PEERS}
    for groups in rounds[:3]:
        for group in groups:
            merged = set().union(*(reach[peer] for peer in group))
            for peer in group:
                reach[peer] = merged
    assert all(reach[peer] == set(PEERS) for peer in PEERS)


def test_round_ids_name_the_whole_membership() -> None:
    members = PEERS[:4]
    rid = round_id(5, members, 0)
    assert round_id(5, list(reversed(members)), 0) == rid
    assert len({rid, round_id(6, members, 0), round_id(5, members, 1), round_id(5, members[:3], 0)}) == 4
