"""A compromised relay cannot stand between two peers: real SignalingClients and real aiortc peers on loopback
connect through a relay that rewrites, swaps or replays descriptions. The tampered attempt is refused by
DescriptionVerifier, naming the check; a faithful attempt right after opens a channel and a message
round-trips."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from hivewire.identity import CertificateVerifier
from hivewire.signaling import (
    Backoff,
    DescriptionVerifier,
    Signal,
    SignalingAuthError,
    SignalingClient,
    SignalingSettings,
    sign_description,
)
from tests.client._fakes import RUN
from tests.client.signaling._relay import Envelope, Relay
from tests.client.signaling._support import Member, assert_loopback_only, new_pc
from tests.support import within

_FINGERPRINT_LINES = re.compile(r"^a=fingerprint:[^\r\n]*\r\n", re.MULTILINE)


@dataclass
class Peer:
    member: Member
    client: SignalingClient
    verifier: DescriptionVerifier
    connections: list[RTCPeerConnection] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.member.peer_id

    def sign(self, receiver: str, kind: str, sdp: str) -> dict[str, Any]:
        member = self.member
        return sign_description(
            member.identity, member.certificate, sender=member.peer_id, receiver=receiver, kind=kind, sdp=sdp,
            now=time.time(),
        )  # fmt: skip

    def new_channel(self) -> tuple[RTCPeerConnection, RTCDataChannel]:
        pc = new_pc()
        self.connections.append(pc)
        return pc, pc.createDataChannel("test", negotiated=True, id=0)


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    relay = Relay()
    await relay.start()
    yield relay
    await relay.close()


@pytest.fixture
async def make_peer(
    relay: Relay, cert_verifier: CertificateVerifier, make_member: Callable[..., Member]
) -> AsyncIterator[Callable[[], Any]]:
    peers: list[Peer] = []
    settings = SignalingSettings(backoff=Backoff(initial_s=0.05, max_s=0.2))

    async def make() -> Peer:
        member = make_member()
        client = SignalingClient(relay.url, lambda: member.certificate, settings=settings)
        verifier = DescriptionVerifier(cert_verifier, run=RUN, self_peer_id=member.peer_id)
        peer = Peer(member, client, verifier)
        peers.append(peer)
        await within(client.start(), "connecting to the relay")
        return peer

    yield make
    for peer in peers:
        for pc in peer.connections:
            await pc.close()
        await peer.client.close()


async def next_signal(peer: Peer, kind: str) -> Signal:
    async def take() -> Signal:
        while True:
            message = await peer.client.recv()
            if isinstance(message, Signal) and message.kind == kind:
                return message

    return await within(take(), f"an {kind} reaching {peer.peer_id}")


async def offer(alice: Peer, bob: Peer) -> tuple[RTCPeerConnection, RTCDataChannel]:
    pc, channel = alice.new_channel()
    await pc.setLocalDescription(await pc.createOffer())
    assert pc.localDescription is not None
    await alice.client.send_signal(bob.peer_id, "offer", alice.sign(bob.peer_id, "offer", pc.localDescription.sdp))
    return pc, channel


async def answer(bob: Peer) -> None:
    """Verify the next offer (SignalingAuthError if refused), apply it, answer, echo what comes."""
    message = await next_signal(bob, "offer")
    verified = bob.verifier.verify(message.from_, message.kind, message.payload)
    pc, channel = bob.new_channel()
    channel.on("message", lambda text: channel.send(f"echo {text}"))
    await pc.setRemoteDescription(RTCSessionDescription(assert_loopback_only(verified.sdp), "offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    assert pc.localDescription is not None
    await bob.client.send_signal(message.from_, "answer", bob.sign(message.from_, "answer", pc.localDescription.sdp))


async def complete(alice: Peer, pc: RTCPeerConnection, channel: RTCDataChannel) -> None:
    """Verify the answer (SignalingAuthError if refused), apply it, and round-trip a message."""
    message = await next_signal(alice, "answer")
    verified = alice.verifier.verify(message.from_, message.kind, message.payload)
    await pc.setRemoteDescription(RTCSessionDescription(assert_loopback_only(verified.sdp), "answer"))
    opened, echoed = asyncio.Event(), asyncio.get_running_loop().create_future()
    channel.on("open", opened.set)
    channel.on("message", lambda text: echoed.done() or echoed.set_result(text))
    if channel.readyState != "open":
        await within(opened.wait(), "the data channel opening")
    channel.send("ping")
    assert await within(echoed, "the echo coming back") == "echo ping"


async def connect(alice: Peer, bob: Peer) -> None:
    pc, channel = await offer(alice, bob)
    await answer(bob)
    await complete(alice, pc, channel)


def fingerprints_of(sdp: str) -> tuple[str, list[str]]:
    lines = "".join(_FINGERPRINT_LINES.findall(sdp))
    return lines, [line.split(":", 1)[1] for line in lines.splitlines()]


def rewrite_sdp(payload: dict[str, Any], other_sdp: str, *, and_list: bool) -> dict[str, Any]:
    """Put another certificate's fingerprints into the SDP (and, optionally, the signed list)."""
    lines, listed = fingerprints_of(other_sdp)
    sdp = _FINGERPRINT_LINES.sub("", payload["sdp"]) + lines
    return {**payload, "sdp": sdp, **({"fingerprints": sorted(listed)} if and_list else {})}


async def test_a_faithful_relay_connects_the_peers(relay: Relay, make_peer: Callable[[], Any]) -> None:
    alice, bob = await make_peer(), await make_peer()
    await connect(alice, bob)
    assert [envelope["kind"] for envelope in relay.relayed] == ["offer", "answer"]


@pytest.mark.parametrize(
    ("case", "tampered_kind", "check"),
    [
        ("rewrite SDP fingerprint", "offer", "fingerprints"),
        ("rewrite SDP fingerprint and the signed list", "offer", "signature"),
        ("swap in another peer's certificate", "offer", "sender"),
        ("substitute another peer's signed offer", "offer", "sender"),
        ("rewrite the answer's SDP fingerprint", "answer", "fingerprints"),
    ],
)
async def test_a_tampering_relay_is_refused(
    relay: Relay, make_peer: Callable[[], Any], case: str, tampered_kind: str, check: str
) -> None:
    alice, bob, mallory = await make_peer(), await make_peer(), await make_peer()
    mitm_pc, _ = mallory.new_channel()
    await mitm_pc.setLocalDescription(await mitm_pc.createOffer())
    assert mitm_pc.localDescription is not None
    mitm_sdp = mitm_pc.localDescription.sdp

    def tamper(envelope: Envelope) -> Envelope:
        if envelope["kind"] != tampered_kind:
            return envelope
        payload = envelope["payload"]
        if case.startswith(("rewrite SDP fingerprint", "rewrite the answer")):
            payload = rewrite_sdp(payload, mitm_sdp, and_list=case.endswith("signed list"))
        elif case.startswith("swap"):
            payload = {**payload, "certificate": mallory.member.certificate}
        else:
            payload = mallory.sign(envelope["to"], "offer", mitm_sdp)
        return {**envelope, "payload": payload}

    relay.tamper = tamper
    pc, channel = await offer(alice, bob)

    async def attempt() -> None:
        await answer(bob)  # a tampered offer is refused here,
        await complete(alice, pc, channel)  # a tampered answer here

    with pytest.raises(SignalingAuthError) as refused:
        await attempt()
    assert refused.value.check == check, str(refused.value)

    relay.tamper = None
    await connect(alice, bob)


async def test_a_replayed_offer_is_refused(relay: Relay, make_peer: Callable[[], Any]) -> None:
    alice, bob = await make_peer(), await make_peer()
    await connect(alice, bob)
    captured = relay.relayed[0]
    assert captured["kind"] == "offer"

    relay.tamper = lambda envelope: captured if envelope["kind"] == "offer" else envelope
    await offer(alice, bob)
    with pytest.raises(SignalingAuthError) as refused:
        await answer(bob)
    assert refused.value.check == "replay", str(refused.value)

    relay.tamper = None
    await connect(alice, bob)
