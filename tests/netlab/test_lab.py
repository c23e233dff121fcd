"""The lab cleans up after itself: a failing test or a crashed run must not leave namespaces behind."""

import os
import subprocess

import pytest

from tests.netlab.lab import PREFIX, Lab, NatKind, list_namespaces, run, sweep_stale

pytestmark = [pytest.mark.netlab, pytest.mark.usefixtures("netlab_ready")]


def test_lab_removes_every_namespace_even_when_the_body_fails() -> None:
    built = Lab()
    made: list[str] = []

    def build_then_fail() -> None:
        with built:
            built.add_home("x", NatKind.SYMMETRIC)
            made.extend(name for name in list_namespaces() if name.startswith(built.tag))
            raise RuntimeError("the test failed")

    with pytest.raises(RuntimeError, match="the test failed"):
        build_then_fail()
    assert len(made) == 3, made  # pub, the router, the home
    assert not [name for name in list_namespaces() if name.startswith(built.tag)]
    assert not built.workdir.exists()


def test_sweep_removes_namespaces_of_dead_runs_only() -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale, live = f"{PREFIX}{finished.pid}-dead-pub", f"{PREFIX}{os.getpid()}-beef-pub"
    for name in (stale, live):
        run(["ip", "netns", "add", name])
    try:
        sweep_stale()  # (a concurrent run's sweep may get to the stale one first: check the outcome)
        assert live in list_namespaces()
        assert stale not in list_namespaces()
    finally:
        for name in set(list_namespaces()) & {stale, live}:
            run(["ip", "netns", "del", name])
