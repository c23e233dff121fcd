"""An offer with relay candidates only is the offerer's relay-only retry; the answer must follow it."""

import pytest

from hivewire.mesh.negotiation import offers_relay_only

HOST = "a=candidate:1 1 UDP 2130706431 10.0.1.2 40000 typ host"
SRFLX = "a=candidate:2 1 UDP 1694498815 203.0.113.10 40001 typ srflx raddr 10.0.1.2 rport 40000"
RELAY = "a=candidate:3 1 UDP 16777215 203.0.113.1 49152 typ relay raddr 203.0.113.10 rport 40001"


def sdp(*candidates: str) -> str:
    return "\r\n".join(
        ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", *candidates]
    )


@pytest.mark.parametrize(
    ("candidates", "relay_only"),
    [
        ((RELAY,), True),
        ((RELAY, RELAY.replace("49152", "49153")), True),
        ((HOST, SRFLX, RELAY), False),
        ((HOST,), False),
        ((), False),  # no candidate at all is not a relay-only offer
    ],
    ids=["one-relay", "two-relays", "mixed", "host", "none"],
)
def test_relay_only_offers_are_recognised(candidates: tuple[str, ...], relay_only: bool) -> None:
    assert offers_relay_only(sdp(*candidates)) is relay_only
