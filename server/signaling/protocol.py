"""Signaling messages (docs/protocol.md, "Signaling"): close codes, validated records, and their codec.

The envelope is validated; `payload` is any JSON value and is kept as the exact text the sender wrote, so it
is relayed byte for byte: peers sign what they send, and the server never re-encodes it."""

from __future__ import annotations

import json
from enum import IntEnum
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PEER_ID_PATTERN = r"^p[a-z2-7]{24}$"
SignalKind = Literal["offer", "answer", "candidate", "bye"]
PresenceState = Literal["joined", "left"]


class CloseCode(IntEnum):
    """The close codes of docs/protocol.md, plus the standard 1001 when the server shuts down."""

    GOING_AWAY = 1001
    TOO_BIG = 1009
    UNAUTHENTICATED = 4001
    EXPIRED = 4002
    BANNED = 4003
    OTHER_RUN = 4004
    PROTOCOL_ERROR = 4005
    RATE_LIMITED = 4008
    REPLACED = 4009


class InvalidMessage(ValueError):
    """A text message that is not one of the peer → server messages; `str()` says what was wrong."""


# ------------------------------------------------------------------------------------------ peer → server


class _Incoming(BaseModel):
    # Unknown fields are ignored, so newer clients can add some; a `from` written by a peer is one of them.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Auth(_Incoming):
    type: Literal["auth"]
    certificate: str = Field(min_length=1, max_length=8192)


class Signal(_Incoming):
    type: Literal["signal"]
    to: str = Field(pattern=PEER_ID_PATTERN)
    kind: SignalKind
    payload: str  # the payload's JSON text exactly as sent (see parse); never decoded further


class Heartbeat(_Incoming):
    type: Literal["heartbeat"]


class PeersRequest(_Incoming):
    type: Literal["peers"]


ClientMessage = Annotated[Auth | Signal | Heartbeat | PeersRequest, Field(discriminator="type")]
_client_message: TypeAdapter[Auth | Signal | Heartbeat | PeersRequest] = TypeAdapter(ClientMessage)


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# Python's decoder accepts NaN and Infinity; a relayed payload must be JSON that every peer can read.
_decoder = json.JSONDecoder(parse_constant=_refuse_constant)
_WHITESPACE = " \t\n\r"


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


def _members(text: str) -> dict[str, object]:
    """A JSON object's members, decoded, except `payload`, which stays the text the sender wrote."""
    members: dict[str, object] = {}
    index = _skip(text, 0)
    if text[index : index + 1] != "{":
        raise ValueError("expected a JSON object")
    index = _skip(text, index + 1)
    if text[index : index + 1] == "}":
        index += 1
    else:
        while True:
            if text[index : index + 1] != '"':
                raise ValueError(f"expected a member name at character {index}")
            name, index = scanstring(text, index + 1)
            index = _skip(text, index)
            if text[index : index + 1] != ":":
                raise ValueError(f"expected ':' at character {index}")
            start = _skip(text, index + 1)
            value, index = _decoder.raw_decode(text, start)
            members[name] = text[start:index] if name == "payload" else value
            index = _skip(text, index)
            separator = text[index : index + 1]
            if separator not in (",", "}"):
                raise ValueError(f"expected ',' or '}}' at character {index}")
            index = _skip(text, index + 1)
            if separator == "}":
                break
    if _skip(text, index) != len(text):
        raise ValueError("unexpected text after the JSON object")
    return members


def parse(text: str) -> Auth | Signal | Heartbeat | PeersRequest:
    """The message in `text`; InvalidMessage says what is wrong with it."""
    try:
        members = _members(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the decoder follows
        raise InvalidMessage(f"not a JSON object: {exc}") from exc
    try:
        return _client_message.validate_python(members)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'message'}: {error['msg']}" for error in exc.errors()[:3]
        )
        raise InvalidMessage(problems) from exc


# ------------------------------------------------------------------------------------------ server → peer


class WelcomeLimits(BaseModel):
    max_message_bytes: int
    messages_per_second: int
    burst: int


class Welcome(BaseModel):
    type: Literal["welcome"] = "welcome"
    peer_id: str
    peers: list[str]
    heartbeat_seconds: int
    limits: WelcomeLimits


class InitialPeers(BaseModel):
    type: Literal["initial_peers"] = "initial_peers"
    peers: list[str]


class Presence(BaseModel):
    type: Literal["presence"] = "presence"
    peer_id: str
    state: PresenceState


class Error(BaseModel):
    type: Literal["error"] = "error"
    code: Literal["unknown_peer", "invalid_message"]
    detail: str
    to: str | None = None


def encode(message: Welcome | InitialPeers | Presence | Error) -> str:
    return message.model_dump_json(exclude_none=True)


def relayed_signal(*, sender: str, signal: Signal) -> str:
    """The envelope the recipient gets: `from` filled by the server, the payload text spliced in unchanged."""
    head = json.dumps({"type": "signal", "from": sender, "to": signal.to, "kind": signal.kind})
    return f'{head[:-1]}, "payload": {signal.payload}}}'
