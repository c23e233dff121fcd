"""The signaling codec: every message of docs/protocol.md decodes; hostile or unknown text is refused clearly."""

from __future__ import annotations

import json

import pytest

from hivewire import signaling
from hivewire.signaling import SignalingProtocolError, decode_server_message, encode_client_message
from hivewire.signaling.messages import (
    MAX_INCOMING_BYTES,
    Auth,
    ErrorMessage,
    Heartbeat,
    InitialPeers,
    PeersRequest,
    Presence,
    Relay,
    Signal,
    SignalRequest,
    Welcome,
)

A = "p" + "a" * 24
B = "p" + "b" * 24
C = "p" + "c" * 24


def decode(document: object) -> object:
    return decode_server_message(json.dumps(document))


def test_public_api_is_sorted() -> None:
    assert signaling.__all__ == sorted(signaling.__all__)


def test_decodes_every_server_message() -> None:
    welcome = decode(
        {
            "type": "welcome",
            "peer_id": A,
            "peers": [B],
            "heartbeat_seconds": 15,
            "limits": {"max_message_bytes": 65536, "messages_per_second": 20, "burst": 100},
            "added_later": True,
        }
    )
    assert isinstance(welcome, Welcome) and welcome.limits.burst == 100
    signal = decode({"type": "signal", "from": B, "to": A, "kind": "offer", "payload": {"sdp": "v=0"}})
    assert isinstance(signal, Signal) and signal.from_ == B and signal.payload == {"sdp": "v=0"}
    assert decode({"type": "initial_peers", "peers": [B, C]}) == InitialPeers(peers=[B, C])
    assert decode({"type": "presence", "peer_id": B, "state": "left"}) == Presence(peer_id=B, state="left")
    error = decode({"type": "error", "code": "unknown_peer", "detail": "gone", "to": B})
    assert error == ErrorMessage(code="unknown_peer", detail="gone", to=B)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b'{"type": "presence"}', "binary frame"),
        ("{not json", "not JSON"),
        ("[" * 100_000 + "]" * 100_000, "larger than"),
        ("[1, 2]", "JSON object"),
        ('{"type": "auth", "certificate": "x"}', "unknown message type 'auth'"),
        ('{"peer_id": "x"}', "unknown message type 'None'"),
        ('{"type": "presence", "peer_id": "not-a-peer", "state": "joined"}', "field 'peer_id'"),
        (f'{{"type": "signal", "from": "{B}", "to": "{A}", "kind": "shout", "payload": 1}}', "field 'kind'"),
        (f'{{"type": "signal", "to": "{A}", "kind": "offer", "payload": 1}}', "field 'from'"),
        ('{"type": "welcome", "peer_id": "' + A + '", "peers": [], "heartbeat_seconds": 0, "limits": {}}', "welcome"),
        ('{"type": "initial_peers", "peers": ["' + B + '"' + f', "{C}"' * 300 + "]}", "field 'peers'"),
    ],
)
def test_refuses_hostile_messages(data: str | bytes, complaint: str) -> None:
    with pytest.raises(SignalingProtocolError, match=complaint):
        decode_server_message(data)


def test_size_is_bounded_in_bytes_before_parsing() -> None:
    detail = "é" * (MAX_INCOMING_BYTES // 2)
    text = json.dumps({"type": "error", "code": "invalid_message", "detail": detail}, ensure_ascii=False)
    assert len(text) < MAX_INCOMING_BYTES < len(text.encode())
    with pytest.raises(SignalingProtocolError, match="larger than"):
        decode_server_message(text)


def test_encodes_client_messages_as_on_the_wire() -> None:
    assert json.loads(encode_client_message(Auth(certificate="jwt"))) == {"type": "auth", "certificate": "jwt"}
    assert json.loads(encode_client_message(Heartbeat())) == {"type": "heartbeat"}
    assert json.loads(encode_client_message(PeersRequest())) == {"type": "peers"}
    signal = SignalRequest(to=B, kind="candidate", payload={"candidate": "c", "sdpMid": "0"})
    assert json.loads(encode_client_message(signal)) == {
        "type": "signal",
        "to": B,
        "kind": "candidate",
        "payload": {"candidate": "c", "sdpMid": "0"},
    }


def test_outgoing_messages_are_validated() -> None:
    with pytest.raises(ValueError, match="to"):
        SignalRequest(to="someone", kind="offer", payload=None)
    with pytest.raises(ValueError, match="certificate"):
        Auth(certificate="x" * 5000)


def test_relay_envelopes_name_the_neighbour_and_run_out() -> None:
    relay = Relay.model_validate({"type": "relay", "to": C, "from": A, "kind": "offer", "payload": {}, "ttl": 2})
    forwarded = relay.forwarded(B)
    assert forwarded is not None
    assert json.loads(encode_client_message(forwarded)) == {
        "type": "relay",
        "to": C,
        "from": B,
        "kind": "offer",
        "payload": {},
        "ttl": 1,
    }
    assert forwarded.forwarded(C) is None
    with pytest.raises(ValueError, match="from"):
        relay.forwarded("not-a-peer")
    with pytest.raises(ValueError, match="ttl"):
        Relay.model_validate({"type": "relay", "to": C, "from": A, "kind": "offer", "payload": {}, "ttl": 50})
