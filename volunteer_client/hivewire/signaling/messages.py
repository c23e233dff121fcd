"""Signaling messages of docs/protocol.md ("Signaling (WebSocket)", "Peer-relayed signaling"), defined once.

The codec only: text in, validated record out, and back. The WebSocket transport (client.py) moves the text.
Every message from the server is hostile until `decode_server_message` accepted it: a text frame, its size
bounded before parsing, JSON, an object with a known `type`, then the record's own fields and bounds.
Fields the protocol adds later are ignored, so an older client keeps working with a newer server.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, ValidationError

from hivewire.signaling.errors import SignalingProtocolError

__all__ = [
    "MAX_INCOMING_BYTES",
    "MAX_RELAY_TTL",
    "Auth",
    "ClientMessage",
    "ErrorMessage",
    "Heartbeat",
    "InitialPeers",
    "Limits",
    "PeersRequest",
    "Presence",
    "Relay",
    "ServerMessage",
    "Signal",
    "SignalKind",
    "SignalRequest",
    "Welcome",
    "decode_server_message",
    "encode_client_message",
]

# The server refuses peer messages over its `max_message_bytes` (64 KiB by default) and adds only the
# envelope when it relays them; twice that leaves room for a server configured a little higher.
MAX_INCOMING_BYTES = 128 * 1024
# A relayed envelope crosses at most this many neighbours (docs/protocol.md sends 2).
MAX_RELAY_TTL = 4
# A sample of live peers; the server sends at most INITIAL_PEERS_COUNT, far below this.
MAX_PEERS_LISTED = 256

PeerId = Annotated[str, StringConstraints(pattern=r"^p[a-z2-7]{24}$")]
SignalKind = Literal["offer", "answer", "candidate", "bye"]
ShortText = Annotated[str, StringConstraints(max_length=1000)]


class _Incoming(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class _Outgoing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Limits(_Incoming):
    """The server's bounds on what this peer sends; crossing them closes the connection."""

    max_message_bytes: int = Field(ge=1024, le=16 * 2**20)
    messages_per_second: float = Field(gt=0, le=10_000)
    burst: int = Field(ge=1, le=100_000)


class Welcome(_Incoming):
    """The server accepted the certificate: who we are, who is here, how often to send a heartbeat."""

    type: Literal["welcome"] = "welcome"
    peer_id: PeerId
    peers: list[PeerId] = Field(max_length=MAX_PEERS_LISTED)
    heartbeat_seconds: float = Field(ge=1, le=3600)
    limits: Limits


class Signal(_Incoming):
    """An envelope relayed from another peer; the server filled `from`, so it names the real sender."""

    type: Literal["signal"] = "signal"
    from_: PeerId = Field(alias="from")
    to: PeerId
    kind: SignalKind
    payload: JsonValue


class InitialPeers(_Incoming):
    """The answer to `PeersRequest`: a fresh sample of live peers, self excluded."""

    type: Literal["initial_peers"] = "initial_peers"
    peers: list[PeerId] = Field(max_length=MAX_PEERS_LISTED)


class Presence(_Incoming):
    """Another peer of the run joined or left."""

    type: Literal["presence"] = "presence"
    peer_id: PeerId
    state: Literal["joined", "left"]


class ErrorMessage(_Incoming):
    """The server dropped one of our messages (`unknown_peer`, `invalid_message`); the connection stays."""

    type: Literal["error"] = "error"
    code: Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,64}$")]
    detail: ShortText = ""
    to: PeerId | None = None


class Auth(_Outgoing):
    """The first message on a new connection."""

    type: Literal["auth"] = "auth"
    certificate: Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class SignalRequest(_Outgoing):
    """An envelope for the server to relay to `to`; the server adds `from`."""

    type: Literal["signal"] = "signal"
    to: PeerId
    kind: SignalKind
    payload: JsonValue


class Heartbeat(_Outgoing):
    type: Literal["heartbeat"] = "heartbeat"


class PeersRequest(_Outgoing):
    type: Literal["peers"] = "peers"


class Relay(_Outgoing):
    """A signaling envelope forwarded by a neighbour over the mesh control channel while the server is away.

    Signed offers and answers inside stay verifiable end to end; `from` is set by the forwarding peer to the
    neighbour it received the envelope from, never taken from the sender's word.
    """

    type: Literal["relay"] = "relay"
    to: PeerId
    from_: PeerId = Field(alias="from")
    kind: SignalKind
    payload: JsonValue
    ttl: int = Field(ge=1, le=MAX_RELAY_TTL)

    def forwarded(self, received_from: str) -> Relay | None:
        """The envelope to pass on after receiving it from neighbour `received_from`; None once ttl runs out."""
        if self.ttl <= 1:
            return None
        return Relay.model_validate({**self.model_dump(by_alias=True), "from": received_from, "ttl": self.ttl - 1})


ServerMessage = Welcome | Signal | InitialPeers | Presence | ErrorMessage
ClientMessage = Auth | SignalRequest | Heartbeat | PeersRequest
_SERVER_TYPES: dict[str, type[ServerMessage]] = {
    "welcome": Welcome,
    "signal": Signal,
    "initial_peers": InitialPeers,
    "presence": Presence,
    "error": ErrorMessage,
}


def decode_server_message(data: str | bytes, *, max_bytes: int = MAX_INCOMING_BYTES) -> ServerMessage:
    """Parse and validate one message from the server; `SignalingProtocolError` says what was wrong."""
    if not isinstance(data, str):
        raise SignalingProtocolError(f"binary frame of {len(data)} bytes; signaling messages are JSON text")
    # Characters first (no copy), then UTF-8 bytes, which are at least as many.
    if len(data) > max_bytes or len(data.encode("utf-8", "surrogatepass")) > max_bytes:
        raise SignalingProtocolError(f"message larger than {max_bytes} bytes")
    try:
        document: Any = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise SignalingProtocolError(f"message is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise SignalingProtocolError(f"message must be a JSON object, got {type(document).__name__}")
    kind = document.get("type")
    model = _SERVER_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        expected = ", ".join(sorted(_SERVER_TYPES))
        raise SignalingProtocolError(f"unknown message type {str(kind)[:64]!r}; expected one of {expected}")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        raise SignalingProtocolError(f"{kind} message: field {where!r}: {first['msg']}") from exc


def encode_client_message(message: ClientMessage | Relay) -> str:
    """The JSON text of an outgoing message, `from` spelled as on the wire."""
    return message.model_dump_json(by_alias=True)
