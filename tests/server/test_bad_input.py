"""Hostile and broken requests get clear 4xx JSON errors, never a 500, and change nothing."""

import logging

import pytest
from fastapi.testclient import TestClient

from tests.conftest import RUN, Account

JSON_ENDPOINTS = [
    "/api/auth/signup",
    "/api/auth/login",
    "/api/runs",
    "/api/tokens",
    "/api/device/approve",
    "/api/runs/tiny-lm-demo/join",
    "/api/runs/tiny-lm-demo/renew",
    "/api/runs/tiny-lm-demo/bans",
]


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
@pytest.mark.parametrize(
    "body",
    [b"{not json", b"", b"[]", b'"text"', b"null", b'{"a": 1}', b"\xff\xfe", b'{"email": {"$gt": ""}}'],
)
def test_malformed_bodies_get_4xx_json(
    client: TestClient, organizer: Account, run_slug: str, path: str, body: bytes
) -> None:
    response = client.post(path, content=body, headers={**organizer.headers, "content-type": "application/json"})
    assert 400 <= response.status_code < 500, (path, body, response.text)
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"]


def test_oversized_bodies_are_refused_before_reading(client: TestClient, organizer: Account) -> None:
    big = b'{"slug": "' + b"a" * 70_000 + b'"}'
    response = client.post("/api/runs", content=big, headers={**organizer.headers, "content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["code"] == "too_large"

    def chunks():  # no Content-Length: the limit counts streamed bytes
        for _ in range(20):
            yield b" " * 8192

    streamed = client.post(
        "/api/runs", content=chunks(), headers={**organizer.headers, "content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert client.get("/api/runs").json()["count"] == 0


def test_unknown_routes_and_methods(client: TestClient) -> None:
    assert client.get("/api/nope").json()["code"] == "not_found"
    response = client.delete("/api/runs")
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"


def test_wrong_types_in_path_and_body(client: TestClient, organizer: Account, run_slug: str) -> None:
    assert client.delete("/api/tokens/abc", headers=organizer.headers).status_code == 422
    response = client.post(
        f"/api/runs/{run_slug}/bans", json={"user_id": "1; DROP TABLE users"}, headers=organizer.headers
    )
    assert response.status_code == 422
    response = client.post("/api/runs", json={**RUN, "target_batch_size": "lots"}, headers=organizer.headers)
    assert response.status_code == 422


def test_requests_are_logged_without_query_strings_or_secrets(
    client: TestClient, organizer: Account, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="hivewire.access"):
        client.get("/api/me?code=secret-oauth-code", headers=organizer.headers)
        client.post("/api/auth/login", json={"email": organizer.email, "password": "wrong password 123"})
    lines = [record.getMessage() for record in caplog.records if record.name == "hivewire.access"]
    assert lines[0].startswith("GET /api/me 200 ")
    assert lines[0].endswith("ms")
    assert lines[1].startswith("POST /api/auth/login 401 ")
    log_text = caplog.text
    for secret in ("secret-oauth-code", organizer.token, "wrong password 123"):
        assert secret not in log_text
