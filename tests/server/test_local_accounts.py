"""Local accounts: signup, login, logout, the session cookie, and the errors people meet."""

import pytest
from fastapi.testclient import TestClient

from tests.conftest import PASSWORD, new_user


def test_signup_signs_in_with_an_httponly_samesite_cookie(client: TestClient) -> None:
    response = client.post(
        "/api/auth/signup", json={"email": "Ada@Example.org", "password": PASSWORD, "display_name": "Ada"}
    )
    assert response.status_code == 201
    assert response.json()["email"] == "ada@example.org"
    cookie = response.headers["set-cookie"].lower()
    assert "hivewire_session=" in cookie
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert client.get("/api/me").json()["display_name"] == "Ada"


def test_first_user_organizes_and_later_users_do_not(client: TestClient) -> None:
    assert new_user(client, "first").is_organizer
    assert not new_user(client, "second").is_organizer


def test_login_logout_round_trip(client: TestClient) -> None:
    user = new_user(client, "grace")
    assert client.get("/api/me").status_code == 401
    response = client.post("/api/auth/login", json={"email": user.email, "password": PASSWORD})
    assert response.status_code == 200
    assert client.get("/api/me").json()["id"] == user.id
    assert client.post("/api/auth/logout").status_code == 204
    assert client.get("/api/me").status_code == 401


def test_wrong_password_and_unknown_email_look_the_same(client: TestClient) -> None:
    user = new_user(client, "linus")
    wrong = client.post("/api/auth/login", json={"email": user.email, "password": "not the password"})
    unknown = client.post("/api/auth/login", json={"email": "nobody@example.org", "password": PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() == {"detail": "wrong email or password", "code": "bad_credentials"}


def test_duplicate_email_is_a_conflict(client: TestClient) -> None:
    new_user(client, "ken")
    response = client.post(
        "/api/auth/signup", json={"email": "KEN@example.org", "password": PASSWORD, "display_name": "Ken 2"}
    )
    assert response.status_code == 409
    assert response.json()["code"] == "email_taken"


@pytest.mark.parametrize("password", ["short", "password123", "aaaaaaaaaaaa", "eve@example.org"])
def test_weak_passwords_are_refused(client: TestClient, password: str) -> None:
    response = client.post(
        "/api/auth/signup", json={"email": "eve@example.org", "password": password, "display_name": "Eve"}
    )
    assert response.status_code == 400
    assert response.json()["code"] == "weak_password"
    assert client.post("/api/auth/login", json={"email": "eve@example.org", "password": password}).status_code == 401


@pytest.mark.parametrize("email", ["not-an-email", "a@", "@b.org", "a b@c.org", ""])
def test_malformed_emails_are_refused(client: TestClient, email: str) -> None:
    response = client.post("/api/auth/signup", json={"email": email, "password": PASSWORD, "display_name": "X"})
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_request"
    assert "email" in response.json()["detail"]


def test_api_tokens_are_listed_and_revoked(client: TestClient) -> None:
    user = new_user(client, "tim")
    listed = client.get("/api/tokens", headers=user.headers).json()
    assert listed["count"] == 1
    assert "token" not in listed["data"][0], "a token is shown once, at creation"
    token_id = listed["data"][0]["id"]
    assert client.delete(f"/api/tokens/{token_id}", headers=user.headers).json()["revoked_at"] is not None
    response = client.get("/api/me", headers=user.headers)
    assert response.status_code == 401
    assert response.json()["code"] == "bad_token"


def test_a_user_cannot_revoke_someone_elses_token(client: TestClient) -> None:
    alice, bob = new_user(client, "alice"), new_user(client, "bob")
    alice_token_id = client.get("/api/tokens", headers=alice.headers).json()["data"][0]["id"]
    assert client.delete(f"/api/tokens/{alice_token_id}", headers=bob.headers).status_code == 404
    assert client.get("/api/me", headers=alice.headers).status_code == 200
