"""HivewireAPI: each status becomes its exception in request(); answers are bounded and validated."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from hivewire import errors
from hivewire.api import MAX_RESPONSE_BYTES, HivewireAPI, JoinResponse, RunSpec
from tests.client._fakes import SERVER

TOKEN = "hw_" + "t" * 43
RUN_SPEC = {
    "slug": "tiny-lm",
    "name": "Tiny LM",
    "description": "a small transformer",
    "recipe": "tiny-lm",
    "recipe_version": "1",
    "strategy": "dedloc",
    "target_batch_size": 4096,
    "group_size": 4,
    "compression": "fp16",
    "visibility": "public",
    "join_policy": "open",
}


def api_answering(handler: Callable[[httpx.Request], httpx.Response], token: str | None = TOKEN) -> HivewireAPI:
    return HivewireAPI(SERVER, token, transport=httpx.MockTransport(handler))


def answer(status: int, body: object = None, **kwargs: object) -> HivewireAPI:
    return api_answering(lambda request: httpx.Response(status, json=body, **kwargs))  # type: ignore[arg-type]


def test_sends_the_bearer_token_and_parses_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": 7, "email": "v@example.org", "display_name": "V", "is_organizer": False})

    with api_answering(handler) as api:
        me = api.me()
    assert (me.id, me.email, me.is_organizer) == (7, "v@example.org", False)
    assert seen[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert str(seen[0].url) == f"{SERVER}/api/me"


@pytest.mark.parametrize(
    ("status", "body", "exception"),
    [
        (400, {"detail": "bad", "code": "invalid"}, errors.RequestRejected),
        (401, {"detail": "token revoked", "code": "unauthorized"}, errors.AuthenticationFailed),
        (403, {"detail": "not on the allowlist", "code": "forbidden"}, errors.Forbidden),
        (403, {"detail": "banned", "code": "banned"}, errors.Banned),
        (403, {"detail": "closed", "code": "run_closed"}, errors.RunClosed),
        (409, {"detail": "full", "code": "run_full"}, errors.RunFull),
        (400, {"detail": "full?", "code": "run_full"}, errors.RequestRejected),  # the code counts with its status
        (404, {"detail": "no such run", "code": "not_found"}, errors.NotFound),
        (409, {"detail": "conflict", "code": "conflict"}, errors.RequestRejected),
        (413, {"detail": "too large", "code": "too_large"}, errors.RequestRejected),
        (422, {"detail": [{"loc": ["body"]}]}, errors.RequestRejected),
        (429, {"detail": "slow down", "code": "rate_limited"}, errors.RateLimited),
        (500, None, errors.ServerError),
        (503, {"detail": "maintenance"}, errors.ServerError),
        (418, {"detail": "teapot"}, errors.APIError),
    ],
)
def test_status_codes_map_to_exceptions(status: int, body: object, exception: type[errors.APIError]) -> None:
    with pytest.raises(exception) as info:
        answer(status, body).me()
    assert type(info.value) is exception
    assert info.value.status == status
    assert info.value.advice


def test_401_without_a_token_means_not_signed_in() -> None:
    api = api_answering(lambda request: httpx.Response(401, json={"detail": "sign in"}), token=None)
    with pytest.raises(errors.NotSignedIn):
        api.me()


def test_retry_after_is_kept() -> None:
    with pytest.raises(errors.RateLimited) as info:
        answer(429, {"detail": "slow"}, headers={"Retry-After": "12"}).me()
    assert info.value.retry_after_s == 12.0


def test_oauth_errors_carry_their_error_code() -> None:
    with pytest.raises(errors.OAuthError) as info:
        answer(400, {"error": "authorization_pending", "error_description": "waiting"}).device_token("dc")
    assert info.value.error == "authorization_pending"


def test_error_detail_cannot_inject_terminal_escapes() -> None:
    with pytest.raises(errors.NotFound) as info:
        answer(404, {"detail": "gone\x1b[2J\rhidden", "code": "not_found"}).me()
    assert "\x1b" not in str(info.value)
    assert "\r" not in str(info.value)


def test_redirects_are_not_followed() -> None:
    with pytest.raises(errors.InvalidResponse, match=r"redirects to https://elsewhere\.test"):
        answer(307, None, headers={"Location": "https://elsewhere.test/api/me"}).me()


def test_unreachable_server() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(errors.ServerUnreachable, match="connection refused"):
        api_answering(handler).me()


def test_oversized_answers_are_refused_unread() -> None:
    declared = answer(200, None, headers={"Content-Length": str(MAX_RESPONSE_BYTES + 1)})
    with pytest.raises(errors.InvalidResponse, match="larger than"):
        declared.me()

    def streamed(request: httpx.Request) -> httpx.Response:
        chunks = (b"x" * 65536 for _ in range(MAX_RESPONSE_BYTES // 65536 + 2))
        return httpx.Response(200, content=chunks)

    with pytest.raises(errors.InvalidResponse, match="larger than"):
        api_answering(streamed).me()


@pytest.mark.parametrize("content", [b"<html>hello</html>", b"[" * 100_000])
def test_non_json_is_refused(content: bytes) -> None:
    api = api_answering(lambda request: httpx.Response(200, content=content))
    with pytest.raises(errors.InvalidResponse, match="not JSON"):
        api.me()


def test_answers_breaking_the_schema_are_refused() -> None:
    bad_run = {**RUN_SPEC, "strategy": "sgd"}
    with pytest.raises(errors.InvalidResponse, match=r"data\.0\.strategy"):
        answer(200, {"data": [bad_run], "count": 1}).runs()


def test_run_limits_default_for_older_servers_and_are_checked() -> None:
    older = api_answering(lambda request: httpx.Response(200, json={"data": [RUN_SPEC], "count": 1})).runs()
    assert (older.data[0].status, older.data[0].max_peers) == ("open", 0)
    closed = {**RUN_SPEC, "status": "closed", "max_peers": 5}
    newer = api_answering(lambda request: httpx.Response(200, json={"data": [closed], "count": 1})).runs()
    assert (newer.data[0].status, newer.data[0].max_peers) == ("closed", 5)
    paused = {**RUN_SPEC, "status": "paused"}
    with pytest.raises(errors.InvalidResponse, match="status"):
        api_answering(lambda request: httpx.Response(200, json={"data": [paused], "count": 1})).runs()


def test_diloco_parameters_default_for_older_servers_and_are_checked() -> None:
    older = answer(200, {"data": [RUN_SPEC], "count": 1}).runs().data[0]
    assert (older.inner_steps, older.overlap) == (500, True)
    chosen = {**RUN_SPEC, "strategy": "diloco", "inner_steps": 32, "overlap": False}
    newer = answer(200, {"data": [chosen], "count": 1}).runs().data[0]
    assert (newer.strategy, newer.inner_steps, newer.overlap) == ("diloco", 32, False)
    for field, bad in [("inner_steps", 0), ("inner_steps", 100_001), ("inner_steps", "32"), ("inner_steps", 3.5)]:
        with pytest.raises(errors.InvalidResponse, match=field):
            answer(200, {"data": [{**RUN_SPEC, field: bad}], "count": 1}).runs()
    for bad in ["false", 0, None]:
        with pytest.raises(errors.InvalidResponse, match="overlap"):
            answer(200, {"data": [{**RUN_SPEC, "overlap": bad}], "count": 1}).runs()


def test_run_list_parses() -> None:
    runs = answer(200, {"data": [RUN_SPEC], "count": 1}).runs()
    assert runs.data == [RunSpec.model_validate(RUN_SPEC)]


def join_body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "peer_id": "p" + "a" * 24,
        "certificate": "x.y.z",
        "certificate_expires_at": "2026-11-24T23:38:00Z",
        "ice_servers": [
            {"urls": ["stun:turn.hive.test:3478"]},
            {"urls": ["turn:turn.hive.test:3478?transport=udp"], "username": "1764027480:42", "credential": "c2VjcmV0"},
        ],
        "run": RUN_SPEC,
        "initial_peers": ["p" + "b" * 24],
        "signaling_url": "ws://hive.test:8000/api/runs/tiny-lm/signal",
        "added_in_a_later_version": True,
    }
    body.update(overrides)
    return body


def test_join_posts_the_peer_key_and_validates_the_answer() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=join_body())

    joined = api_answering(handler).join("tiny-lm", "A" * 43)
    assert isinstance(joined, JoinResponse)
    assert [server.kinds for server in joined.ice_servers] == [["stun"], ["turn"]]
    assert seen[0].url.path == "/api/runs/tiny-lm/join"
    assert seen[0].content == b'{"peer_key":"' + b"A" * 43 + b'"}'


@pytest.mark.parametrize(
    "overrides",
    [
        {"peer_id": "P-not-a-peer"},
        {"certificate_expires_at": "2026-11-24T23:38:00"},
        {"ice_servers": [{"urls": ["http://evil.test"]}]},
        {"initial_peers": ["p" + "a" * 24] * 65},
        {"signaling_url": "http://hive.test/signal"},
        {"certificate": "x" * 5000},
    ],
)
def test_join_answers_breaking_the_protocol_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(errors.InvalidResponse):
        answer(200, join_body(**overrides)).join("tiny-lm", "A" * 43)


def test_join_refuses_a_slug_that_would_change_the_path() -> None:
    with pytest.raises(ValueError, match="not a run slug"):
        answer(200, join_body()).join("../admin", "A" * 43)


def test_device_code_refuses_a_non_web_verification_uri() -> None:
    body = {
        "device_code": "dc",
        "user_code": "BCDF-GHJK",
        "verification_uri": "javascript:alert(1)",
        "expires_in": 600,
        "interval": 5,
    }
    with pytest.raises(errors.InvalidResponse, match="verification_uri"):
        answer(200, body).device_code()
