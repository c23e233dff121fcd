"""The signaling WebSocket against the real app on both databases: who gets in (and with which close code
when not), relay with a server-filled `from` and an untouched payload, presence, samples, replacement, and
the bounds on size, rate, malformed messages, binary frames, heartbeats and certificate lifetime."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from hivewire_server.core import keys
from hivewire_server.core.config import Settings
from tests.conftest import RUN, Account, make_settings, new_user, run_in_app
from tests.server.test_join import join

FAKE_PEER = "p" + "z" * 24


@pytest.fixture
def settings(request: pytest.FixtureRequest, database_url: str) -> Settings:
    """The app's settings; a test lowers limits through `with_settings` to reach them in a few messages."""
    return make_settings(database_url, **getattr(request, "param", {}))


def with_settings(**overrides: object) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("settings", [overrides], indirect=True, ids=["limits"])


def url(slug: str) -> str:
    return f"/api/runs/{slug}/signal"


@contextmanager
def connected(
    client: TestClient, slug: str, certificate: str, *, by_header: bool = True
) -> Iterator[tuple[WebSocketTestSession, dict[str, Any]]]:
    """An authenticated socket and the welcome it got."""
    headers = {"Authorization": f"Bearer {certificate}"} if by_header else {}
    with client.websocket_connect(url(slug), headers=headers) as socket:
        if not by_header:
            socket.send_json({"type": "auth", "certificate": certificate})
        welcome = socket.receive_json()
        assert welcome["type"] == "welcome", welcome
        yield socket, welcome


def closed(socket: WebSocketTestSession) -> tuple[int, str]:
    """The close code and reason, skipping whatever the server sent before closing."""
    while True:
        try:
            socket.receive_text()
        except WebSocketDisconnect as exc:
            return exc.code, exc.reason


def refused(client: TestClient, slug: str, *, header: str | None = None, first: str | None = None) -> int:
    with client.websocket_connect(url(slug), headers={"Authorization": header} if header else {}) as socket:
        if first is not None:
            socket.send_text(first)
        return closed(socket)[0]


def sign(client: TestClient, claims: dict[str, Any]) -> str:
    """A certificate with these claims, signed with the server's own key."""

    async def action(session: AsyncSession) -> str:
        key = await keys.active_key(session)
        return jwt.encode(
            claims, key.private_key, algorithm="EdDSA", headers={"kid": key.kid, "typ": "hivewire-peer+jwt"}
        )

    return run_in_app(client, action)


def signal(to: str, payload: object = None, kind: str = "offer") -> dict[str, Any]:
    return {"type": "signal", "to": to, "kind": kind, "payload": payload if payload is not None else {"sdp": "v=0"}}


def test_auth_by_header_and_by_first_message(client: TestClient, volunteer: Account, run_slug: str) -> None:
    first, second = join(client, volunteer, run_slug), join(client, volunteer, run_slug)
    with connected(client, run_slug, first["certificate"]) as (a, welcome_a):
        assert welcome_a == {
            "type": "welcome",
            "peer_id": first["peer_id"],
            "peers": [],
            "heartbeat_seconds": 15,
            "limits": {"max_message_bytes": 65536, "messages_per_second": 20, "burst": 100},
        }
        with connected(client, run_slug, second["certificate"], by_header=False) as (_, welcome_b):
            assert welcome_b["peer_id"] == second["peer_id"]
            assert welcome_b["peers"] == [first["peer_id"]]
            assert a.receive_json() == {"type": "presence", "peer_id": second["peer_id"], "state": "joined"}


def test_invalid_certificates_are_refused_with_their_close_code(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    body = join(client, volunteer, run_slug)
    claims = jwt.decode(body["certificate"], options={"verify_signature": False})
    kid = jwt.get_unverified_header(body["certificate"])["kid"]
    forged = jwt.encode(
        claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": kid, "typ": "hivewire-peer+jwt"}
    )
    expired = sign(client, {**claims, "iat": claims["iat"] - 7200, "exp": claims["iat"] - 3600})
    client.post("/api/runs", json={**RUN, "slug": "other-run"}, headers=organizer.headers)
    other_run = join(client, volunteer, "other-run")["certificate"]

    assert refused(client, run_slug, header=f"Bearer {forged}") == 4001
    assert refused(client, run_slug, first=json.dumps({"type": "auth", "certificate": forged})) == 4001
    assert refused(client, run_slug, header=f"Bearer {expired}") == 4002
    assert refused(client, run_slug, header=f"Bearer {other_run}") == 4004
    assert refused(client, run_slug, header="Bearer x.y.z") == 4001
    assert refused(client, run_slug, header=f"Bearer {volunteer.token}") == 4001  # an API token is no certificate
    assert refused(client, run_slug, header=f"Basic {body['certificate']}") == 4001
    assert refused(client, run_slug, first='{"type": "heartbeat"}') == 4001  # absent: something else came first
    assert refused(client, run_slug, first="garbage") == 4001


def test_a_banned_user_is_refused_and_a_ban_closes_open_sockets(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    banned, other = join(client, volunteer, run_slug), join(client, new_user(client, "wendy"), run_slug)
    with (
        connected(client, run_slug, other["certificate"]) as (watcher, _),
        connected(client, run_slug, banned["certificate"]) as (socket, _),
    ):
        assert watcher.receive_json()["state"] == "joined"
        response = client.post(f"/api/runs/{run_slug}/bans", json={"user_id": volunteer.id}, headers=organizer.headers)
        assert response.status_code == 201
        assert closed(socket)[0] == 4003
        assert watcher.receive_json() == {"type": "presence", "peer_id": banned["peer_id"], "state": "left"}
    assert refused(client, run_slug, header=f"Bearer {banned['certificate']}") == 4003


def test_relay_fills_from_and_passes_the_payload_byte_for_byte(
    client: TestClient, volunteer: Account, run_slug: str
) -> None:
    a, b = join(client, volunteer, run_slug), join(client, new_user(client, "wendy"), run_slug)
    with (
        connected(client, run_slug, a["certificate"]) as (sender, _),
        connected(client, run_slug, b["certificate"]) as (receiver, _),
    ):
        sender.receive_json()  # b joined
        sender.send_json({**signal(b["peer_id"], {"sdp": "v=0"}), "from": FAKE_PEER})
        assert receiver.receive_json() == {
            "type": "signal",
            "from": a["peer_id"],
            "to": b["peer_id"],
            "kind": "offer",
            "payload": {"sdp": "v=0"},
        }
        # Spacing, number spelling, escapes and key order that re-encoding would change.
        payload = '{ "z": 1.0E+2,"a" : "\\u00e9\\n", "n": [ -0, 1e-7 ], "nested": {"b": null, "a": true} }'
        sender.send_text(f'{{"type": "signal", "to": "{b["peer_id"]}", "kind": "answer", "payload": {payload}}}')
        text = receiver.receive_text()
        assert text.endswith(f'"payload": {payload}}}')
        assert json.loads(text)["from"] == a["peer_id"]


def test_unknown_recipient_gets_an_error_and_the_connection_stays(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    client.post("/api/runs", json={**RUN, "slug": "other-run"}, headers=organizer.headers)
    elsewhere = join(client, new_user(client, "wendy"), "other-run")
    mine = join(client, volunteer, run_slug)
    with (
        connected(client, "other-run", elsewhere["certificate"]),
        connected(client, run_slug, mine["certificate"]) as (socket, _),
    ):
        for recipient in (FAKE_PEER, elsewhere["peer_id"]):  # a peer of another run is unknown here
            socket.send_json(signal(recipient))
            error = socket.receive_json()
            assert error["type"] == "error" and error["code"] == "unknown_peer" and error["to"] == recipient
        socket.send_json({"type": "peers"})
        assert socket.receive_json() == {"type": "initial_peers", "peers": []}


@with_settings(initial_peers_count=2)
def test_peers_request_samples_others_never_self(client: TestClient, volunteer: Account, run_slug: str) -> None:
    asker, *others = [join(client, volunteer, run_slug) for _ in range(4)]
    with (
        connected(client, run_slug, others[0]["certificate"]),
        connected(client, run_slug, others[1]["certificate"]),
        connected(client, run_slug, others[2]["certificate"]),
        connected(client, run_slug, asker["certificate"]) as (socket, welcome),
    ):
        everyone_else = {other["peer_id"] for other in others}
        assert len(welcome["peers"]) == 2 and set(welcome["peers"]) <= everyone_else
        socket.send_json({"type": "peers"})
        answer = socket.receive_json()
        assert answer["type"] == "initial_peers"
        assert len(answer["peers"]) == 2 and set(answer["peers"]) <= everyone_else


def test_presence_announces_joins_and_departures(client: TestClient, volunteer: Account, run_slug: str) -> None:
    a, b = join(client, volunteer, run_slug), join(client, volunteer, run_slug)
    with connected(client, run_slug, a["certificate"]) as (watcher, _):
        with connected(client, run_slug, b["certificate"]):
            assert watcher.receive_json() == {"type": "presence", "peer_id": b["peer_id"], "state": "joined"}
        assert watcher.receive_json() == {"type": "presence", "peer_id": b["peer_id"], "state": "left"}


def test_a_newer_connection_replaces_the_older(client: TestClient, volunteer: Account, run_slug: str) -> None:
    a, b = join(client, volunteer, run_slug), join(client, volunteer, run_slug)
    with connected(client, run_slug, b["certificate"]) as (watcher, _):
        with connected(client, run_slug, a["certificate"]) as (older, _):
            assert watcher.receive_json()["state"] == "joined"
            with connected(client, run_slug, a["certificate"], by_header=False) as (newer, welcome):
                assert welcome["peers"] == [b["peer_id"]]
                assert closed(older)[0] == 4009
                watcher.send_json(signal(a["peer_id"]))
                assert newer.receive_json()["from"] == b["peer_id"]
        # The replaced connection left no "left" behind: the next presence event is the newer one leaving.
        assert watcher.receive_json() == {"type": "presence", "peer_id": a["peer_id"], "state": "joined"}
        assert watcher.receive_json() == {"type": "presence", "peer_id": a["peer_id"], "state": "left"}


@with_settings(signal_max_message_bytes=1024)
def test_an_oversize_message_closes_with_1009(client: TestClient, volunteer: Account, run_slug: str) -> None:
    body = join(client, volunteer, run_slug)
    with connected(client, run_slug, body["certificate"]) as (socket, welcome):
        assert welcome["limits"]["max_message_bytes"] == 1024
        socket.send_json(signal(FAKE_PEER, {"sdp": "é" * 600}))  # 600 characters, 1200 bytes
        code, reason = closed(socket)
        assert code == 1009 and reason.endswith("bytes over the limit of 1024")


@with_settings(signal_messages_per_second=1, signal_burst=5)
def test_a_flood_closes_with_4008(client: TestClient, volunteer: Account, run_slug: str) -> None:
    body = join(client, volunteer, run_slug)
    with connected(client, run_slug, body["certificate"]) as (socket, _):
        for _ in range(50):
            socket.send_json({"type": "heartbeat"})
        assert closed(socket)[0] == 4008


def test_malformed_messages_get_errors_and_three_in_a_row_close(
    client: TestClient, volunteer: Account, run_slug: str
) -> None:
    body = join(client, volunteer, run_slug)
    nested = "[" * 5000 + "]" * 5000
    deep = f'{{"type": "signal", "to": "{FAKE_PEER}", "kind": "bye", "payload": {nested}}}'
    not_json = f'{{"type": "signal", "to": "{FAKE_PEER}", "kind": "offer", "payload": NaN}}'
    with connected(client, run_slug, body["certificate"]) as (socket, _):
        for text in ("not json", '{"type": "signal", "to": "nobody"}'):
            socket.send_text(text)
            error = socket.receive_json()
            assert error["type"] == "error" and error["code"] == "invalid_message", error
        socket.send_json({"type": "heartbeat"})  # a good message resets the count
        for text in (deep, not_json):
            socket.send_text(text)
            assert socket.receive_json()["code"] == "invalid_message"
        socket.send_json({"type": "auth", "certificate": body["certificate"]})  # the third in a row
        assert closed(socket) == (4005, "3 malformed messages in a row")


def test_a_binary_frame_closes_with_4005(client: TestClient, volunteer: Account, run_slug: str) -> None:
    body = join(client, volunteer, run_slug)
    with connected(client, run_slug, body["certificate"]) as (socket, _):
        socket.send_bytes(b'{"type": "heartbeat"}')
        assert closed(socket)[0] == 4005


def test_a_certificate_that_expires_while_connected_closes_with_4002(
    client: TestClient, volunteer: Account, run_slug: str
) -> None:
    body = join(client, volunteer, run_slug)
    claims = jwt.decode(body["certificate"], options={"verify_signature": False})
    now = int(time.time())
    # Expired 28 s ago: still accepted within the 30 s clock-skew leeway, so it runs out about 2 s from now.
    certificate = sign(client, {**claims, "iat": now - 600, "exp": now - 28})
    with connected(client, run_slug, certificate) as (socket, _):
        assert closed(socket)[0] == 4002


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@with_settings(signal_heartbeat_seconds=1)
def test_a_silent_peer_is_disconnected_after_three_heartbeats(
    client: TestClient, volunteer: Account, run_slug: str
) -> None:
    body = join(client, volunteer, run_slug)
    with connected(client, run_slug, body["certificate"]) as (socket, welcome):
        assert welcome["heartbeat_seconds"] == 1
        assert closed(socket) == (4005, "no message for 3 s; send a heartbeat every 1 s")


def test_a_peer_is_live_for_join_exactly_while_connected(client: TestClient, volunteer: Account, run_slug: str) -> None:
    connected_peer = join(client, volunteer, run_slug)
    assert join(client, volunteer, run_slug)["initial_peers"] == []
    with connected(client, run_slug, connected_peer["certificate"]):
        assert connected_peer["peer_id"] in join(client, volunteer, run_slug)["initial_peers"]
    assert join(client, volunteer, run_slug)["initial_peers"] == []
