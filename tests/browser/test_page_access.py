"""Who may do what on the dashboard's pages, over HTTP without a browser: forms need the session's CSRF token,
organizer pages refuse volunteers, private runs look absent, and nobody revokes another user's token."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tests.conftest import PASSWORD, RUN, Account


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None, "the page has no form with a CSRF token"
    return found.group(1)


def sign_in(client: TestClient, account: Account) -> str:
    """Signs the client's cookie jar in through the page and returns the new session's CSRF token."""
    client.cookies.clear()
    form = {"email": account.email, "password": PASSWORD, "csrf": csrf_of(client.get("/login").text), "next": "/"}
    assert client.post("/login", data=form, follow_redirects=False).status_code == 303
    return csrf_of(client.get("/").text)  # signing in starts a fresh session, with a token of its own


def test_pages_that_need_an_account_send_visitors_to_sign_in(client: TestClient, run_slug: str) -> None:
    for path in ("/me", f"/runs/{run_slug}/join", f"/runs/{run_slug}/manage", "/organize/runs/new"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/login?next=/"), path
    assert client.get(f"/runs/{run_slug}").status_code == 200  # the run page is public


def test_volunteers_cannot_reach_organizer_pages_or_forms(
    client: TestClient, volunteer: Account, organizer: Account, run_slug: str
) -> None:
    csrf = sign_in(client, volunteer)
    for path in ("/organize/runs/new", f"/runs/{run_slug}/edit", f"/runs/{run_slug}/manage"):
        page = client.get(path)
        assert page.status_code == 403 and "only organizers" in page.text, path
    ban = client.post(f"/runs/{run_slug}/bans", data={"user_id": str(organizer.id), "csrf": csrf})
    assert ban.status_code == 403 and "only organizers" in ban.text
    edit = client.post(f"/runs/{run_slug}/edit", data={**RUN, "name": "Taken over", "csrf": csrf})
    assert edit.status_code == 403 and "only organizers" in edit.text
    assert client.get(f"/api/runs/{run_slug}").json()["name"] == RUN["name"]


def test_forms_without_the_session_csrf_token_change_nothing(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    sign_in(client, organizer)
    forged = {"user_id": str(volunteer.id), "csrf": "not-the-token"}
    assert client.post(f"/runs/{run_slug}/bans", data=forged).json()["code"] == "bad_csrf"
    members = client.get(f"/api/runs/{run_slug}/members", headers=organizer.headers).json()["data"]
    assert all(member["banned_at"] is None for member in members)
    token_id = client.get("/api/tokens", headers=organizer.headers).json()["data"][0]["id"]
    assert client.post(f"/me/tokens/{token_id}/revoke", data={"csrf": "stale"}).status_code == 403
    assert client.get("/api/tokens", headers=organizer.headers).json()["data"][0]["revoked_at"] is None


def test_private_runs_look_absent_and_tokens_stay_their_owners(
    client: TestClient, organizer: Account, volunteer: Account
) -> None:
    private = {**RUN, "slug": "secret-run", "visibility": "private"}
    assert client.post("/api/runs", json=private, headers=organizer.headers).status_code == 201
    assert client.get("/runs/secret-run").status_code == 404
    assert client.get("/runs/secret-run/events").status_code == 404
    csrf = sign_in(client, volunteer)
    assert client.get("/runs/secret-run").status_code == 404
    assert "secret-run" not in client.get("/").text
    organizers_token = client.get("/api/tokens", headers=organizer.headers).json()["data"][0]["id"]
    refused = client.post(f"/me/tokens/{organizers_token}/revoke", data={"csrf": csrf})
    assert refused.status_code == 404 and "no API token" in refused.text
    assert client.get("/api/tokens", headers=organizer.headers).json()["data"][0]["revoked_at"] is None
