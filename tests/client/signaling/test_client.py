"""SignalingClient against a real websockets relay on loopback: authentication, relaying, peers, heartbeats,
reconnection after drops, certificate renewal on 4002, and the close codes after which it must stop."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from hivewire.errors import Banned
from hivewire.signaling import (
    Backoff,
    ErrorMessage,
    Incoming,
    Presence,
    Signal,
    SignalingBanned,
    SignalingClient,
    SignalingProtocolError,
    SignalingRejected,
    SignalingSettings,
    SignalingUnavailable,
    Welcome,
)
from tests.client.signaling._relay import Relay
from tests.client.signaling._support import LOOPBACK, Member
from tests.support import eventually, within

FAST = SignalingSettings(backoff=Backoff(initial_s=0.05, max_s=0.2), start_timeout_s=5.0, request_timeout_s=5.0)


class Certificates:
    """A certificate source that hands out the given tokens in turn (the last one repeats), counting calls."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return self.tokens[min(self.calls, len(self.tokens)) - 1]


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    relay = Relay(heartbeat_seconds=1)
    await relay.start()
    yield relay
    await relay.close()


@pytest.fixture
async def make_client(relay: Relay) -> AsyncIterator[Callable[..., SignalingClient]]:
    clients: list[SignalingClient] = []

    def make(certificate: Callable[[], Any], url: str | None = None, **settings: Any) -> SignalingClient:
        client = SignalingClient(url or relay.url, certificate, settings=dataclasses.replace(FAST, **settings))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def next_of(client: SignalingClient, kind: type[Incoming], what: str) -> Any:
    async def take() -> Incoming:
        while not isinstance(message := await client.recv(), kind):
            pass
        return message

    return await within(take(), what)


async def test_authenticates_and_relays_a_signal(
    make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]
) -> None:
    alice, bob = make_member(), make_member()
    a, b = make_client(Certificates(alice.certificate)), make_client(Certificates(bob.certificate))
    await a.start()
    await b.start()
    assert a.connected and a.welcome is not None and a.welcome.peer_id == alice.peer_id
    assert b.welcome is not None and b.welcome.peers == [alice.peer_id]

    await b.send_signal(alice.peer_id, "candidate", {"candidate": "x"})
    signal = await next_of(a, Signal, "the signal reaching alice")
    assert (signal.from_, signal.to, signal.kind, signal.payload) == (
        bob.peer_id,
        alice.peer_id,
        "candidate",
        {"candidate": "x"},
    )


async def test_delivers_welcome_presence_and_errors(
    make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]
) -> None:
    alice, bob = make_member(), make_member()
    a = make_client(Certificates(alice.certificate))
    await a.start()
    assert isinstance(await within(a.recv(), "the welcome"), Welcome)
    b = make_client(Certificates(bob.certificate))
    await b.start()
    joined = await next_of(a, Presence, "bob's presence")
    assert (joined.peer_id, joined.state) == (bob.peer_id, "joined")

    await a.send_signal(make_member().peer_id, "bye", None)
    error = await next_of(a, ErrorMessage, "the unknown_peer error")
    assert error.code == "unknown_peer"

    await b.close()
    left = await next_of(a, Presence, "bob leaving")
    assert (left.peer_id, left.state) == (bob.peer_id, "left")


async def test_request_peers(make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]) -> None:
    members = [make_member() for _ in range(3)]
    clients = [make_client(Certificates(member.certificate)) for member in members]
    for client in clients:
        await client.start()
    peers = await within(clients[0].request_peers(), "the peers answer")
    assert sorted(peers) == sorted(member.peer_id for member in members[1:])


async def test_sends_heartbeats_at_the_pace_of_the_welcome(
    relay: Relay, make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]
) -> None:
    await make_client(Certificates(make_member().certificate)).start()
    await eventually(lambda: relay.heartbeats >= 2, "two heartbeats (welcome asks for one per second)")


async def test_drops_malformed_messages_and_stays_connected(
    relay: Relay, make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]
) -> None:
    alice, bob = make_member(), make_member()
    a = make_client(Certificates(alice.certificate))
    await a.start()
    server_side = relay.peers[alice.peer_id]
    for garbage in ("not json", "[1]", '{"type": "surprise"}', '{"type": "presence", "peer_id": "x"}', b"\x00"):
        await server_side.send(garbage)
    await server_side.send(f'{{"type": "presence", "peer_id": "{bob.peer_id}", "state": "joined"}}')
    presence = await next_of(a, Presence, "the valid message after the garbage")
    assert presence.peer_id == bob.peer_id
    assert a.connected and len(relay.certificates) == 1


async def test_refuses_to_send_more_than_the_server_accepts(
    make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]
) -> None:
    a = make_client(Certificates(make_member().certificate))
    await a.start()
    with pytest.raises(SignalingProtocolError, match="max_message_bytes=65536"):
        await a.send_signal(make_member().peer_id, "offer", {"sdp": "x" * 70_000})
    assert a.connected


async def test_reconnects_after_the_connection_drops(
    relay: Relay, make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]
) -> None:
    alice, bob = make_member(), make_member()
    certificates = Certificates(alice.certificate)
    a, b = make_client(certificates), make_client(Certificates(bob.certificate))
    await a.start()
    await b.start()

    relay.drop(alice.peer_id)
    await eventually(lambda: len(relay.certificates) == 3 and a.connected, "alice reconnecting")
    assert certificates.calls == 2
    await b.send_signal(alice.peer_id, "candidate", {"after": "reconnect"})
    signal = await next_of(a, Signal, "a signal over the new connection")
    assert signal.payload == {"after": "reconnect"}


async def test_a_send_while_disconnected_waits_for_the_reconnection(
    relay: Relay, make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]
) -> None:
    alice, bob = make_member(), make_member()
    a = make_client(Certificates(alice.certificate))
    b = make_client(Certificates(bob.certificate), backoff=Backoff(initial_s=0.5, max_s=0.5, jitter=0))
    await a.start()
    await b.start()
    relay.drop(bob.peer_id)
    await eventually(lambda: not b.connected, "bob noticing the drop")
    await within(b.send_signal(alice.peer_id, "bye", "see you"), "sending once reconnected")
    signal = await next_of(a, Signal, "the signal sent once reconnected")
    assert signal.payload == "see you"


async def test_renews_the_certificate_after_4002(
    relay: Relay, make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]
) -> None:
    member, renewed = make_member(), make_member()  # another key stands in for a renewed certificate
    certificates = Certificates(member.certificate, renewed.certificate)
    a = make_client(certificates)
    await a.start()
    await relay.close_peer(member.peer_id, 4002, "certificate expired")
    await eventually(lambda: relay.certificates == [member.certificate, renewed.certificate], "a fresh certificate")
    await eventually(lambda: a.connected, "reconnecting with it")


async def test_an_expired_certificate_at_start_is_renewed(
    relay: Relay, make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]
) -> None:
    old, fresh = make_member(), make_member()
    relay.refuse[old.certificate] = (4002, "certificate expired")
    a = make_client(Certificates(old.certificate, fresh.certificate))
    await a.start()
    assert a.welcome is not None and a.welcome.peer_id == fresh.peer_id


async def test_stops_for_good_when_banned_mid_session(
    relay: Relay, make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]
) -> None:
    alice = make_member()
    a = make_client(Certificates(alice.certificate))
    await a.start()
    await relay.close_peer(alice.peer_id, 4003, "banned")

    async def drain() -> None:
        while True:
            await a.recv()

    with pytest.raises(SignalingBanned) as info:
        await within(drain(), "recv() raising the ban")
    assert info.value.close_code == 4003
    assert not a.connected
    with pytest.raises(SignalingBanned):
        await a.send_signal(make_member().peer_id, "bye", None)
    with pytest.raises(SignalingBanned):
        await a.request_peers()
    assert relay.certificates == [alice.certificate], "a banned client must not reconnect"


@pytest.mark.parametrize(
    ("code", "error"), [(4001, SignalingRejected), (4003, SignalingBanned), (4004, SignalingRejected)]
)
async def test_start_fails_on_a_refusing_close_code(
    relay: Relay,
    make_client: Callable[..., SignalingClient],
    make_member: Callable[..., Member],
    code: int,
    error: type,
) -> None:
    member = make_member()
    relay.refuse[member.certificate] = (code, "no")
    client = make_client(Certificates(member.certificate))
    with pytest.raises(error) as info:
        await client.start()
    assert info.value.close_code == code
    assert relay.certificates == [member.certificate]


async def test_a_certificate_source_refused_by_the_server_stops_the_client(
    make_client: Callable[..., SignalingClient],
) -> None:
    def banned() -> str:
        raise Banned("POST /api/runs/tiny-lm/renew: banned", status=403, code="banned")

    with pytest.raises(SignalingRejected, match="cannot get a peer certificate") as info:
        await make_client(banned).start()
    assert info.value.advice == Banned.advice


async def test_start_fails_when_the_upgrade_is_refused(make_client: Callable[..., SignalingClient]) -> None:
    def no_such_run(connection: ServerConnection, request: Request) -> Response:
        return connection.respond(HTTPStatus.NOT_FOUND, "no such run\n")

    async with serve(lambda ws: ws.close(), LOOPBACK, 0, process_request=no_such_run) as server:
        port = server.sockets[0].getsockname()[1]
        client = make_client(Certificates("unused"), url=f"ws://{LOOPBACK}:{port}/api/runs/gone/signal")
        with pytest.raises(SignalingRejected, match="HTTP 404"):
            await client.start()


async def test_start_gives_up_when_nothing_listens(make_client: Callable[..., SignalingClient]) -> None:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    client = make_client(Certificates("unused"), url=f"ws://{LOOPBACK}:{port}/signal", start_timeout_s=0.5)
    with pytest.raises(SignalingUnavailable):
        await client.start()
    with pytest.raises(SignalingUnavailable, match="closed"):
        await client.recv()


async def test_close_ends_every_task(
    make_client: Callable[..., SignalingClient], make_member: Callable[..., Member]
) -> None:
    client = make_client(Certificates(make_member().certificate))
    await client.start()
    assert isinstance(await client.recv(), Welcome)
    waiting = asyncio.create_task(client.recv())
    await client.close()
    assert not client.connected
    with pytest.raises(SignalingUnavailable, match="closed"):
        await within(waiting, "recv() waking up on close")
    assert not [task for task in asyncio.all_tasks() if task.get_name().startswith("signaling")]
    await client.close()  # idempotent


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff()
    rng = random.Random(7)
    delays = [backoff.delay_s(failures, rng) for failures in range(1, 12)]
    for failures, delay in enumerate(delays, start=1):
        base = min(30.0, 0.5 * 2 ** (failures - 1))
        assert base / 2 <= delay <= base
    assert max(delays) <= 30.0
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial_s=0)


def test_only_websocket_urls() -> None:
    with pytest.raises(ValueError, match="ws://"):
        SignalingClient("http://hive.test/api/runs/x/signal", lambda: "token")
