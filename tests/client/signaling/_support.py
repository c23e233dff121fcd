"""Helpers shared by the signaling tests: bounded waits, peers with certificates, loopback-only SDP checks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeVar

from aiortc import RTCConfiguration, RTCPeerConnection

from hivewire.identity import PeerIdentity

LOOPBACK = "127.0.0.1"
_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ", re.MULTILINE)
T = TypeVar("T")


def assert_loopback_only(sdp: str) -> str:
    """Return `sdp` after checking that every candidate in it is on loopback."""
    addresses = set(_CANDIDATE.findall(sdp))
    assert addresses <= {LOOPBACK}, f"non-loopback candidates in SDP: {addresses}"
    return sdp


@dataclass
class Member:
    """A volunteer of the run: its peer key and a certificate signed for it."""

    identity: PeerIdentity
    certificate: str

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


def new_pc() -> RTCPeerConnection:
    """A peer connection that asks no STUN server (aiortc's default would be a public one)."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))
