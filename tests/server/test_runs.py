"""Runs: organizers create and edit them; visibility decides who sees them."""

import pytest
from fastapi.testclient import TestClient

from tests.conftest import RUN, Account


def test_organizer_creates_a_run_with_every_field(client: TestClient, organizer: Account) -> None:
    spec = {
        **RUN,
        "slug": "full",
        "recipe_version": "2.1",
        "visibility": "public",
        "join_policy": "open",
        "max_peers": 12,
        "strategy": "diloco",
        "inner_steps": 64,
        "overlap": False,
    }
    response = client.post("/api/runs", json=spec, headers=organizer.headers)
    assert response.status_code == 201
    assert response.json() == {**spec, "status": "open"}
    assert client.get("/api/runs/full").json() == {**spec, "status": "open"}


def test_defaults_fill_optional_fields(client: TestClient, organizer: Account) -> None:
    minimal = {"slug": "mini", "name": "Mini", "recipe": "tiny-classifier", "target_batch_size": 256}
    body = client.post("/api/runs", json=minimal, headers=organizer.headers).json()
    assert body["strategy"] == "dedloc"
    assert body["compression"] == "none"
    assert body["visibility"] == "public"
    assert body["join_policy"] == "open"
    assert body["recipe_version"] == "1"
    assert (body["max_peers"], body["status"]) == (0, "open")
    assert (body["inner_steps"], body["overlap"]) == (500, True)


def test_volunteers_cannot_create_runs(client: TestClient, volunteer: Account) -> None:
    response = client.post("/api/runs", json=RUN, headers=volunteer.headers)
    assert response.status_code == 403
    assert response.json()["code"] == "not_organizer"


def test_duplicate_slug_is_a_conflict(client: TestClient, organizer: Account, run_slug: str) -> None:
    response = client.post("/api/runs", json=RUN, headers=organizer.headers)
    assert response.status_code == 409
    assert response.json()["code"] == "slug_taken"


def test_private_runs_are_hidden_from_outsiders(client: TestClient, organizer: Account, volunteer: Account) -> None:
    client.post("/api/runs", json={**RUN, "slug": "secret", "visibility": "private"}, headers=organizer.headers)
    client.post("/api/runs", json={**RUN, "slug": "open-run"}, headers=organizer.headers)
    assert [run["slug"] for run in client.get("/api/runs").json()["data"]] == ["open-run"]
    assert client.get("/api/runs", headers=volunteer.headers).json()["count"] == 1
    assert client.get("/api/runs", headers=organizer.headers).json()["count"] == 2
    hidden = client.get("/api/runs/secret", headers=volunteer.headers)
    assert hidden.status_code == 404, "a private run looks like no run at all"
    client.post("/api/runs/secret/allowlist", json={"user_id": volunteer.id}, headers=organizer.headers)
    assert client.get("/api/runs/secret", headers=volunteer.headers).status_code == 200


def test_organizer_edits_a_run(client: TestClient, organizer: Account, volunteer: Account, run_slug: str) -> None:
    changed = client.patch(
        f"/api/runs/{run_slug}", json={"group_size": 4, "compression": "int8"}, headers=organizer.headers
    )
    assert changed.status_code == 200
    assert (changed.json()["group_size"], changed.json()["compression"]) == (4, "int8")
    assert client.patch(f"/api/runs/{run_slug}", json={"name": None}, headers=organizer.headers).status_code == 400
    assert client.patch(f"/api/runs/{run_slug}", json={"group_size": 8}, headers=volunteer.headers).status_code == 403


def test_members_list_shows_bans(client: TestClient, organizer: Account, volunteer: Account, run_slug: str) -> None:
    client.post(
        f"/api/runs/{run_slug}/bans", json={"user_id": volunteer.id, "reason": "spam"}, headers=organizer.headers
    )
    (member,) = client.get(f"/api/runs/{run_slug}/members", headers=organizer.headers).json()["data"]
    assert member["user_id"] == volunteer.id
    assert member["ban_reason"] == "spam"
    assert member["banned_at"] is not None


def test_ban_errors(client: TestClient, organizer: Account, run_slug: str) -> None:
    unknown = client.post(f"/api/runs/{run_slug}/bans", json={"user_id": 999}, headers=organizer.headers)
    assert unknown.status_code == 404
    assert unknown.json()["code"] == "unknown_user"
    myself = client.post(f"/api/runs/{run_slug}/bans", json={"user_id": organizer.id}, headers=organizer.headers)
    assert myself.status_code == 400
    assert myself.json()["code"] == "self_ban"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("slug", "Bad Slug"),
        ("slug", "x"),
        ("recipe", "../etc/passwd"),
        ("strategy", "sgd"),
        ("compression", "zip"),
        ("target_batch_size", 0),
        ("target_batch_size", 10**10),
        ("group_size", 1),
        ("group_size", 65),  # a round result names its contributors in a 64-bit mask
        ("inner_steps", 0),
        ("inner_steps", 100_001),
        ("inner_steps", "many"),
        ("overlap", "maybe"),
        ("overlap", None),
        ("visibility", "secret"),
        ("join_policy", "invite"),
        ("name", ""),
        ("description", "x" * 4001),
        ("unexpected", "field"),
    ],
)
def test_invalid_run_fields_are_refused(client: TestClient, organizer: Account, field: str, value: object) -> None:
    response = client.post("/api/runs", json={**RUN, field: value}, headers=organizer.headers)
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_request"
    assert field in response.json()["detail"]
    assert client.get("/api/runs").json()["count"] == 0
