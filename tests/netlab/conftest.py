"""The lab fixture: one lab per module (building it takes well under a second, coturn one more)."""

import secrets
from collections.abc import Iterator

import pytest

from tests.netlab.lab import Lab, NatKind, netlab_unavailable, sweep_stale

# Homes by label: each scenario gets its own pair, so one test's conntrack state cannot help or hurt another.
HOMES = {
    "cone-1": NatKind.CONE,
    "cone-2": NatKind.CONE,
    "sym-1": NatKind.SYMMETRIC,
    "sym-2": NatKind.SYMMETRIC,
    "blocked": NatKind.UDP_BLOCKED,
    "cone-3": NatKind.CONE,
}


@pytest.fixture(scope="session")
def netlab_ready() -> None:
    """Skip, saying why, where the machine cannot build the lab (not root, no ip netns, no coturn)."""
    reason = netlab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    sweep_stale()


@pytest.fixture(scope="module")
def lab(netlab_ready: None) -> Iterator[Lab]:
    """The lab with coturn and every home; torn down (namespaces, veths, coturn) even when tests fail."""
    with Lab() as built:
        built.start_turn(secrets.token_hex(16))
        for label, nat in HOMES.items():
            built.add_home(label, nat)
        yield built
