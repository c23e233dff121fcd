"""RFC 8628: code → (pending, slow_down) → approve in the browser → token → join."""

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.models import DeviceCode
from tests.conftest import PASSWORD, Account, new_user, run_in_app
from tests.server.test_join import new_peer_key

GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def start(client: TestClient) -> dict[str, object]:
    response = client.post("/api/device/code", data={"client_id": "hivewire-cli"})
    assert response.status_code == 200, response.text
    return response.json()


def poll(client: TestClient, device_code: object) -> tuple[int, dict[str, str]]:
    response = client.post(
        "/api/device/token", data={"grant_type": GRANT, "device_code": device_code, "client_id": "hivewire-cli"}
    )
    return response.status_code, response.json()


def rewind_last_poll(client: TestClient) -> None:
    """Pretend the client waited the interval, without sleeping in the test."""

    async def rewind(session: AsyncSession) -> None:
        for row in await session.scalars(select(DeviceCode)):
            row.last_polled_at = row.last_polled_at and row.last_polled_at - timedelta(seconds=60)

    run_in_app(client, rewind)


def test_code_response_has_every_rfc_field(client: TestClient) -> None:
    code = start(client)
    assert set(code) == {
        "device_code",
        "user_code",
        "verification_uri",
        "verification_uri_complete",
        "expires_in",
        "interval",
    }
    assert code["verification_uri"] == "http://testserver/device"
    assert str(code["verification_uri_complete"]).endswith(f"user_code={code['user_code']}")
    assert code["expires_in"] == 600
    assert code["interval"] == 5
    user_code = str(code["user_code"])
    assert len(user_code) == 9 and user_code[4] == "-"


def test_full_device_flow_then_join(client: TestClient, volunteer: Account, run_slug: str) -> None:
    code = start(client)
    assert poll(client, code["device_code"]) == (
        400,
        {"error": "authorization_pending", "error_description": "waiting for approval in the browser"},
    )
    status, body = poll(client, code["device_code"])
    assert (status, body["error"]) == (400, "slow_down")

    # The volunteer approves in the browser, through the page (session cookie + CSRF token).
    client.post("/api/auth/login", json={"email": volunteer.email, "password": PASSWORD})
    page = client.get(f"/device?user_code={code['user_code']}")
    assert page.status_code == 200 and str(code["user_code"]) in page.text
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    approved = client.post(
        "/device", data={"user_code": str(code["user_code"]).lower(), "decision": "approve", "csrf": csrf}
    )
    assert approved.status_code == 200 and "Device approved" in approved.text
    client.cookies.clear()

    rewind_last_poll(client)
    status, body = poll(client, code["device_code"])
    assert status == 200 and body["token_type"] == "Bearer"
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    assert client.get("/api/me", headers=headers).json()["id"] == volunteer.id

    joined = client.post(f"/api/runs/{run_slug}/join", json={"peer_key": new_peer_key()[1]}, headers=headers)
    assert joined.status_code == 200, joined.text

    rewind_last_poll(client)
    assert poll(client, code["device_code"])[1]["error"] == "invalid_grant", "a device code buys one token"


def test_denied_code_answers_access_denied(client: TestClient, volunteer: Account) -> None:
    code = start(client)
    denied = client.post(
        "/api/device/approve", json={"user_code": code["user_code"], "approve": False}, headers=volunteer.headers
    )
    assert denied.json() == {"status": "denied"}
    assert poll(client, code["device_code"])[1]["error"] == "access_denied"


def test_expired_code_answers_expired_token(client: TestClient, volunteer: Account) -> None:
    code = start(client)

    async def expire(session: AsyncSession) -> None:
        for row in await session.scalars(select(DeviceCode)):
            row.expires_at = row.created_at - timedelta(seconds=1)

    run_in_app(client, expire)
    assert poll(client, code["device_code"])[1]["error"] == "expired_token"
    late = client.post(
        "/api/device/approve", json={"user_code": code["user_code"], "approve": True}, headers=volunteer.headers
    )
    assert late.status_code == 404


def test_approval_needs_a_signed_in_user(client: TestClient) -> None:
    code = start(client)
    response = client.post("/api/device/approve", json={"user_code": code["user_code"], "approve": True})
    assert response.status_code == 401
    assert client.get("/device", follow_redirects=False).headers["location"].startswith("/login?next=/device")


def test_device_form_without_csrf_token_is_refused(client: TestClient, volunteer: Account) -> None:
    code = start(client)
    client.post("/api/auth/login", json={"email": volunteer.email, "password": PASSWORD})
    response = client.post("/device", data={"user_code": code["user_code"], "decision": "approve", "csrf": "forged"})
    assert response.status_code == 403
    client.cookies.clear()
    assert poll(client, code["device_code"])[1]["error"] == "authorization_pending"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"grant_type": "password", "device_code": "x", "client_id": "hivewire-cli"}, "unsupported_grant_type"),
        ({"grant_type": GRANT, "device_code": "nope", "client_id": "hivewire-cli"}, "invalid_grant"),
        ({"grant_type": GRANT, "device_code": "nope", "client_id": "other"}, "invalid_client"),
    ],
)
def test_token_endpoint_errors(client: TestClient, data: dict[str, str], error: str) -> None:
    response = client.post("/api/device/token", data=data)
    assert response.status_code in (400, 401)
    assert response.json()["error"] == error


def test_token_endpoint_accepts_json_and_refuses_garbage(client: TestClient) -> None:
    code = start(client)
    response = client.post(
        "/api/device/token", json={"grant_type": GRANT, "device_code": code["device_code"], "client_id": "hivewire-cli"}
    )
    assert response.json()["error"] == "authorization_pending"
    garbage = client.post("/api/device/token", content=b"{not json", headers={"content-type": "application/json"})
    assert garbage.status_code == 400 and garbage.json()["error"] == "invalid_request"
    nested = client.post("/api/device/token", json={"grant_type": ["x"], "device_code": 1})
    assert nested.status_code == 400 and nested.json()["error"] == "invalid_request"


@pytest.mark.parametrize("user_code", ["AAAA-AAAA", "BCDF", "BCDF-GHJK-LMNP", "1234-5678"])
def test_unknown_or_malformed_user_codes(client: TestClient, user_code: str) -> None:
    user = new_user(client, "mallory")
    response = client.post("/api/device/approve", json={"user_code": user_code, "approve": True}, headers=user.headers)
    assert response.status_code in (400, 404, 422)
    assert "detail" in response.json()
