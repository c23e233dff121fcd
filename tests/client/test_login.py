"""Device-flow polling (RFC 8628) against a scripted token endpoint, with an injected clock and sleep."""

from __future__ import annotations

import httpx
import pytest

from hivewire.api import CLIENT_ID, DEVICE_GRANT, DeviceCode, HivewireAPI
from hivewire.errors import LoginFailed, ServerError
from hivewire.login import SLOW_DOWN_STEP_S, wait_for_token
from tests.client._fakes import SERVER

TOKEN = "hw_" + "a" * 43
CODE = DeviceCode(
    device_code="device-code-1",
    user_code="BCDF-GHJK",
    verification_uri=f"{SERVER}/device",
    verification_uri_complete=f"{SERVER}/device?user_code=BCDFGHJK",
    expires_in=600,
    interval=5,
)


class FakeTime:
    """sleep() advances monotonic() instead of waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


class TokenEndpoint:
    """Answers the scripted responses in order and records each poll."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers = list(answers)
        self.polls: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/device/token"
        self.polls.append(request)
        return self.answers.pop(0)


def oauth(error: str) -> httpx.Response:
    return httpx.Response(400, json={"error": error})


def granted() -> httpx.Response:
    return httpx.Response(200, json={"access_token": TOKEN, "token_type": "Bearer"})


def poll(endpoint: TokenEndpoint, clock: FakeTime, code: DeviceCode = CODE) -> str:
    api = HivewireAPI(SERVER, transport=httpx.MockTransport(endpoint))
    return wait_for_token(api, code, sleep=clock.sleep, monotonic=clock.monotonic)


def test_pending_then_slow_down_then_token() -> None:
    endpoint = TokenEndpoint(
        oauth("authorization_pending"), oauth("slow_down"), oauth("authorization_pending"), granted()
    )
    clock = FakeTime()
    assert poll(endpoint, clock) == TOKEN
    # The first poll waits one interval; slow_down adds 5 s to that poll's successors, for good.
    assert clock.sleeps == [5, 5, 5 + SLOW_DOWN_STEP_S, 5 + SLOW_DOWN_STEP_S]
    assert len(endpoint.polls) == 4
    body = endpoint.polls[0].read()
    assert b'"grant_type":"' + DEVICE_GRANT.encode() + b'"' in body
    assert b'"device_code":"device-code-1"' in body
    assert CLIENT_ID.encode() in body


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("access_denied", "denied"),
        ("expired_token", "expired"),
        ("invalid_grant", "no longer knows"),
        ("unsupported_grant_type", "refused the login"),
    ],
)
def test_refusals_end_the_wait(error: str, reason: str) -> None:
    with pytest.raises(LoginFailed, match=reason):
        poll(TokenEndpoint(oauth("authorization_pending"), oauth(error)), FakeTime())


def test_gives_up_when_the_code_expires_without_polling_past_it() -> None:
    endpoint = TokenEndpoint(*[oauth("authorization_pending")] * 200)
    clock = FakeTime()
    with pytest.raises(LoginFailed, match="expired"):
        poll(endpoint, clock)
    assert clock.now <= CODE.expires_in
    assert len(endpoint.polls) == CODE.expires_in // CODE.interval


def test_slow_down_cannot_stretch_the_interval_without_bound() -> None:
    code = CODE.model_copy(update={"expires_in": 3600})
    endpoint = TokenEndpoint(*[oauth("slow_down")] * 30, granted())
    clock = FakeTime()
    assert poll(endpoint, clock, code) == TOKEN
    assert max(clock.sleeps) == 60


def test_server_errors_are_not_swallowed() -> None:
    with pytest.raises(ServerError):
        poll(TokenEndpoint(httpx.Response(500)), FakeTime())
