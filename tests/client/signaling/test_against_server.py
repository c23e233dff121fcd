"""The signaling client against the real server: uvicorn on a loopback port (in a thread), real certificates from
joining over HTTP, two SignalingClients exchanging a signed offer and answer, and a ban closing with 4003."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from aiortc import RTCSessionDescription
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivewire.api import HivewireAPI, JoinResponse
from hivewire.identity import CertificateVerifier, PeerIdentity
from hivewire.signaling import (
    DescriptionVerifier,
    Signal,
    SignalingBanned,
    SignalingClient,
    sign_description,
)
from hivewire_server.core.config import Settings
from hivewire_server.main import create_app
from tests.client._fakes import raw_public
from tests.client.signaling._support import LOOPBACK, assert_loopback_only, new_pc
from tests.conftest import Account, make_settings
from tests.support import within

SERVER_START_TIMEOUT_S = 10.0  # uvicorn that has not started by then failed
SERVER_STOP_TIMEOUT_S = 10.0

pytestmark = pytest.mark.slow


@pytest.fixture
def port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def settings(database_url: str, port: int) -> Settings:
    """tests/conftest.py's settings, public at the address uvicorn listens on (the certificates' issuer)."""
    return make_settings(database_url, public_url=f"http://{LOOPBACK}:{port}", stun_urls=[], turn_urls=[])


@pytest.fixture
def server(settings: Settings, port: int) -> Iterator[str]:
    """The real app under uvicorn in a thread of its own, so blocking HTTP calls in the test cannot stall it."""
    config = uvicorn.Config(
        create_app(settings), host=LOOPBACK, port=port, ws="websockets-sansio", log_level="warning", access_log=False
    )
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not running.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running.started, f"uvicorn did not start on port {port} within {SERVER_START_TIMEOUT_S} s"
    yield f"http://{LOOPBACK}:{port}"
    running.should_exit = True
    thread.join(SERVER_STOP_TIMEOUT_S)
    assert not thread.is_alive(), f"uvicorn did not stop within {SERVER_STOP_TIMEOUT_S} s"


@dataclass
class Joined:
    identity: PeerIdentity
    joined: JoinResponse
    client: SignalingClient
    verifier: DescriptionVerifier

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def sign(self, receiver: str, kind: str, sdp: str) -> dict[str, object]:
        return sign_description(
            self.identity, self.joined.certificate, sender=self.peer_id, receiver=receiver, kind=kind, sdp=sdp,
            now=time.time(),
        )  # fmt: skip


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as client:
        yield client


@pytest.fixture
async def peers(
    server: str, http: httpx.Client, organizer: Account, volunteer: Account, run_slug: str
) -> AsyncIterator[list[Joined]]:
    """The organizer and the volunteer, each joined with a key of its own and connected to signaling."""
    joined: list[Joined] = []
    try:
        for account in (organizer, volunteer):
            key = Ed25519PrivateKey.generate()
            identity = PeerIdentity(private_key=key, public_key_raw=raw_public(key))
            with HivewireAPI(server, account.token) as api:
                response = await asyncio.to_thread(api.join, run_slug, identity.peer_key)
            client = SignalingClient(response.signaling_url, lambda r=response: r.certificate)
            verifier = DescriptionVerifier(
                CertificateVerifier(server, http=http), run=run_slug, self_peer_id=identity.peer_id
            )
            joined.append(Joined(identity, response, client, verifier))
            await within(client.start(), f"{identity.peer_id} connecting to the server's signaling")
        yield joined
    finally:
        for peer in joined:
            await peer.client.close()


async def next_signal(peer: Joined, kind: str) -> Signal:
    async def take() -> Signal:
        while True:
            message = await peer.client.recv()
            if isinstance(message, Signal) and message.kind == kind:
                return message

    return await within(take(), f"an {kind} reaching {peer.peer_id} through the server")


async def test_a_signed_offer_and_answer_cross_the_real_server(
    peers: list[Joined], organizer: Account, volunteer: Account
) -> None:
    alice, bob = peers
    assert alice.joined.signaling_url.startswith(f"ws://{LOOPBACK}:")
    offerer, answerer = new_pc(), new_pc()
    try:
        channel = offerer.createDataChannel("test", negotiated=True, id=0)
        echo = answerer.createDataChannel("test", negotiated=True, id=0)
        echo.on("message", lambda text: echo.send(f"echo {text}"))
        await offerer.setLocalDescription(await offerer.createOffer())
        assert offerer.localDescription is not None
        await alice.client.send_signal(
            bob.peer_id, "offer", alice.sign(bob.peer_id, "offer", offerer.localDescription.sdp)
        )

        offer = await next_signal(bob, "offer")
        assert offer.from_ == alice.peer_id  # filled in by the server
        verified = await asyncio.to_thread(bob.verifier.verify, offer.from_, offer.kind, offer.payload)
        assert verified.certificate.user_id == organizer.id
        await answerer.setRemoteDescription(RTCSessionDescription(assert_loopback_only(verified.sdp), "offer"))
        await answerer.setLocalDescription(await answerer.createAnswer())
        assert answerer.localDescription is not None
        await bob.client.send_signal(
            alice.peer_id, "answer", bob.sign(alice.peer_id, "answer", answerer.localDescription.sdp)
        )

        answer = await next_signal(alice, "answer")
        verified = await asyncio.to_thread(alice.verifier.verify, answer.from_, answer.kind, answer.payload)
        assert verified.certificate.user_id == volunteer.id
        await offerer.setRemoteDescription(RTCSessionDescription(assert_loopback_only(verified.sdp), "answer"))

        opened, echoed = asyncio.Event(), asyncio.get_running_loop().create_future()
        channel.on("open", opened.set)
        channel.on("message", lambda text: echoed.done() or echoed.set_result(text))
        if channel.readyState != "open":
            await within(opened.wait(), "the data channel opening")
        channel.send("ping")
        assert await within(echoed, "the echo coming back") == "echo ping"
    finally:
        await offerer.close()
        await answerer.close()


async def test_a_ban_stops_the_client_with_4003(
    peers: list[Joined], server: str, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    banned = peers[1]
    with HivewireAPI(server, organizer.token) as api:
        await asyncio.to_thread(api.request, "POST", f"/api/runs/{run_slug}/bans", json_body={"user_id": volunteer.id})

    async def drain() -> None:
        while True:
            await banned.client.recv()

    with pytest.raises(SignalingBanned) as info:
        await within(drain(), "recv() raising the ban")
    assert info.value.close_code == 4003
    assert not banned.client.connected
