"""Control records prove: a record round-trips only when it matches its type's schema exactly; anything
else from a peer raises ControlRecordError naming what was expected."""

import msgpack
import pytest

from hivewire.mesh import ControlCodec, ControlRecordError, RecordSchema

GOSSIP = RecordSchema("gossip", {"epoch": int, "loss": (int, float), "peer": str})


@pytest.fixture
def codec() -> ControlCodec:
    return ControlCodec([GOSSIP], max_record_bytes=1024)


def test_valid_record_round_trips(codec: ControlCodec) -> None:
    record = {"type": "gossip", "epoch": 3, "loss": 2.5, "peer": "pabc"}
    assert codec.decode(codec.encode(record)) == record


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"type": "teleport", "x": 1}, "unknown record type 'teleport'"),
        ({"epoch": 1}, "unknown record type None"),
        ({"type": 7}, "unknown record type 7"),
        ({"type": "gossip", "epoch": 1, "loss": 1.0}, r"missing fields \['peer'\]"),
        ({"type": "gossip", "epoch": 1, "loss": 1.0, "peer": "p", "x": 0}, r"unexpected \['x'\]"),
        ({"type": "gossip", "epoch": True, "loss": 1.0, "peer": "p"}, "gossip.epoch: expected int, got bool"),
        ({"type": "gossip", "epoch": 1, "loss": "1", "peer": "p"}, "expected int or float, got str"),
        ({"type": "ping", "nonce": -1}, "ping.nonce: -1 is outside"),
        ([1, 2], "expected a map, got list"),
    ],
)
def test_invalid_records_are_refused(codec: ControlCodec, record: object, message: str) -> None:
    with pytest.raises(ControlRecordError, match=message):
        codec.decode(msgpack.packb(record))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xc1", "not a msgpack record"),
        (msgpack.packb({"type": "ping", "nonce": 1}) + b"\x00", "not a msgpack record"),
        (msgpack.packb({1: "ping"}), "not a msgpack record"),
        (b"\x81\xa4type\xa4pi", "not a msgpack record"),
        (b"\x91" * 5000, "exceeds the limit of 1024"),
        ("text", "expected a binary msgpack record, got str"),
    ],
)
def test_malformed_bytes_are_refused(codec: ControlCodec, data: bytes, message: str) -> None:
    with pytest.raises(ControlRecordError, match=message):
        codec.decode(data)


def test_outgoing_records_are_validated_and_bounded(codec: ControlCodec) -> None:
    with pytest.raises(ControlRecordError, match="unknown record type"):
        codec.encode({"type": "nope"})
    with pytest.raises(ControlRecordError, match=r"packs to \d+ bytes, the limit is 1024"):
        codec.encode({"type": "gossip", "epoch": 1, "loss": 0.1, "peer": "p" * 2000})


def test_schemas_are_registered_once(codec: ControlCodec) -> None:
    with pytest.raises(ValueError, match="already registered"):
        codec.register(GOSSIP)
    with pytest.raises(ValueError, match="must not declare a 'type' field"):
        codec.register(RecordSchema("bad", {"type": str}))
