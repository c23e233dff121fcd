"""The public API of hivewire.mesh is small, sorted and importable."""

import hivewire.mesh


def test_all_is_sorted_and_importable() -> None:
    assert hivewire.mesh.__all__ == sorted(hivewire.mesh.__all__)
    for name in hivewire.mesh.__all__:
        assert getattr(hivewire.mesh, name) is not None
