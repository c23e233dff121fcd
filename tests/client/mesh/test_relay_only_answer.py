"""An offer with relay candidates only is the offerer's relay-only retry; the answer must follow it. And once
policy-all ICE with a peer failed, later offers to it go relay-only until RELAY_MEMORY_S has passed."""

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivewire.identity import PeerIdentity
from hivewire.mesh import Link, LinkError, LinkSettings
from hivewire.mesh.ice_timing import remove_check_bound
from hivewire.mesh.negotiation import RELAY_MEMORY_S, Attempt, IceFailed, Negotiator, offers_relay_only

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


# --- relay memory: after policy all failed with a peer, offers to it go relay-only for RELAY_MEMORY_S -----------

TURN = {"urls": ["turn:127.0.0.1:3478?transport=udp"], "username": "1764027480:42", "credential": "c2VjcmV0"}


class _NeverOpens:
    """Stands in for a link whose ICE fails: what Negotiator._open sees behind two symmetric NATs."""

    async def wait_open(self) -> None:
        raise LinkError("link to peer-b did not open: peer connection failed")


@pytest.fixture
def negotiator() -> Iterator[tuple[Negotiator, list[bool], list[float]]]:
    """A Negotiator with a TURN server whose every attempt fails ICE; yields it, the relay_only of each
    attempt, and its clock (a one-element list to move time)."""
    key = Ed25519PrivateKey.generate()
    identity = PeerIdentity(private_key=key, public_key_raw=key.public_key().public_bytes_raw())
    now = [0.0]

    async def unused_send(*args: object) -> None:
        raise AssertionError("no signal is sent here")

    negotiating = Negotiator(
        identity,
        lambda: "certificate",
        [TURN],
        send=unused_send,
        link_settings=LinkSettings(),
        answer_timeout_s=1.0,
        on_dead=lambda link, reason: None,
        clock=lambda: now[0],
    )
    tried: list[bool] = []

    async def failing_offer(attempt: Attempt, *, relay_only: bool) -> Link:
        tried.append(relay_only)
        await negotiating._open(attempt, _NeverOpens(), relay_only=relay_only)  # type: ignore[arg-type]
        raise AssertionError("unreachable: the link never opens")

    negotiating._offer = failing_offer  # type: ignore[method-assign]
    yield negotiating, tried, now
    remove_check_bound()


async def test_policy_all_failure_makes_the_next_offers_relay_only(
    negotiator: tuple[Negotiator, list[bool], list[float]],
) -> None:
    negotiating, tried, now = negotiator
    with pytest.raises(IceFailed):
        await negotiating.offer(Attempt.new("peer-b", "offer"))
    assert tried == [False, True]  # policy all, then the relay-only retry
    assert negotiating.relay_only_retries == 1
    tried.clear()
    now[0] += RELAY_MEMORY_S - 1
    with pytest.raises(IceFailed):
        await negotiating.offer(Attempt.new("peer-b", "offer"))
    assert tried == [True]  # straight to the relay: no second doomed attempt
    with pytest.raises(IceFailed):
        await negotiating.offer(Attempt.new("peer-c", "offer"))
    assert tried == [True, False, True]  # another peer starts on policy all


async def test_the_relay_memory_expires(negotiator: tuple[Negotiator, list[bool], list[float]]) -> None:
    negotiating, tried, now = negotiator
    with pytest.raises(IceFailed):
        await negotiating.offer(Attempt.new("peer-b", "offer"))
    tried.clear()
    now[0] += RELAY_MEMORY_S
    with pytest.raises(IceFailed):
        await negotiating.offer(Attempt.new("peer-b", "offer"))
    assert tried == [False, True]  # policy all again, direct where the NATs now allow it


async def test_a_failed_answer_under_policy_all_is_remembered_too(
    negotiator: tuple[Negotiator, list[bool], list[float]],
) -> None:
    negotiating, tried, _ = negotiator
    with pytest.raises(IceFailed):
        await negotiating._open(Attempt.new("peer-b", "answer"), _NeverOpens(), relay_only=False)  # type: ignore[arg-type]
    with pytest.raises(IceFailed):
        await negotiating.offer(Attempt.new("peer-b", "offer"))
    assert tried == [True]
