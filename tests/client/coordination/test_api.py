"""The public API of hivewire.coordination is small, sorted and importable, and its schemas fit the mesh codec."""

import hivewire.coordination
from hivewire.mesh import ControlCodec


def test_all_is_sorted_and_importable() -> None:
    assert hivewire.coordination.__all__ == sorted(hivewire.coordination.__all__)
    for name in hivewire.coordination.__all__:
        assert getattr(hivewire.coordination, name) is not None


def test_the_record_types_register_next_to_the_links_own() -> None:
    codec = ControlCodec(hivewire.coordination.COORDINATION_SCHEMAS)
    assert codec.decode(codec.encode({"type": "ping", "nonce": 1})) == {"type": "ping", "nonce": 1}
