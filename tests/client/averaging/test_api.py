"""The public API of hivewire.averaging is explicit, sorted and importable."""

import hivewire.averaging


def test_all_is_sorted_and_every_name_exists() -> None:
    names = hivewire.averaging.__all__
    assert names == sorted(names)
    assert all(hasattr(hivewire.averaging, name) for name in names)
