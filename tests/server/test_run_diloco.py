"""diloco's parameters belong to the run: every volunteer gets the organizer's inner_steps and overlap from the
run spec and the join answer, and migration 0004 gives existing runs the values `hivewire join` used before."""

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from hivewire_server.core.db import create_engine
from hivewire_server.core.migrate import downgrade, upgrade
from tests.conftest import PASSWORD, RUN, Account, _postgres_admin, _postgres_url
from tests.server.test_join import join

SELECT_DILOCO = "SELECT slug, inner_steps, overlap FROM runs"


def test_the_join_answer_carries_the_runs_diloco_parameters(
    client: TestClient, organizer: Account, volunteer: Account
) -> None:
    spec = {**RUN, "strategy": "diloco", "inner_steps": 40, "overlap": False}
    assert client.post("/api/runs", json=spec, headers=organizer.headers).status_code == 201
    run = join(client, volunteer, RUN["slug"])["run"]
    assert (run["strategy"], run["inner_steps"], run["overlap"]) == ("diloco", 40, False)


def test_the_organizer_edits_them_and_they_survive_a_strategy_switch(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    url = f"/api/runs/{run_slug}"
    changed = client.patch(url, json={"inner_steps": 1000, "overlap": False}, headers=organizer.headers)
    assert changed.status_code == 200, changed.text
    assert (changed.json()["inner_steps"], changed.json()["overlap"]) == (1000, False)
    client.patch(url, json={"strategy": "diloco"}, headers=organizer.headers)
    client.patch(url, json={"strategy": "dedloc"}, headers=organizer.headers)
    kept = client.get(url).json()
    assert (kept["strategy"], kept["inner_steps"], kept["overlap"]) == ("dedloc", 1000, False)
    refused = client.patch(url, json={"inner_steps": 5}, headers=volunteer.headers)
    assert refused.status_code == 403
    assert client.get(url).json()["inner_steps"] == 1000


@pytest.mark.parametrize(
    "changes", [{"inner_steps": 0}, {"inner_steps": 100_001}, {"inner_steps": None}, {"overlap": None}]
)
def test_bad_edits_change_nothing(client: TestClient, organizer: Account, run_slug: str, changes: dict) -> None:
    response = client.patch(f"/api/runs/{run_slug}", json=changes, headers=organizer.headers)
    assert response.status_code in (400, 422), response.text
    run = client.get(f"/api/runs/{run_slug}").json()
    assert (run["inner_steps"], run["overlap"]) == (500, True)


def _signed_in_csrf(client: TestClient, account: Account, page: str) -> tuple[str, str]:
    """Signs in through the session cookie, as a browser would; the page and the CSRF token of its form."""
    client.post("/api/auth/login", json={"email": account.email, "password": PASSWORD})
    html = client.get(page).text
    return html, html.split('name="csrf" value="')[1].split('"')[0]


def test_the_run_form_creates_and_edits_them(client: TestClient, organizer: Account) -> None:
    html, csrf = _signed_in_csrf(client, organizer, "/organize/runs/new")
    assert 'name="inner_steps" type="number" value="500"' in html
    assert "<option selected>yes</option><option>no</option>" in html
    form = {**RUN, "target_batch_size": "64", "group_size": "4", "strategy": "diloco", "csrf": csrf}
    created = client.post("/organize/runs/new", data={**form, "inner_steps": "64", "overlap": "no"})
    assert created.status_code == 200 and created.url.path.endswith("/manage"), created.text
    run = client.get(f"/api/runs/{RUN['slug']}").json()
    assert (run["inner_steps"], run["overlap"]) == (64, False)
    assert "averaging every 64 inner steps, training waits for it" in client.get(f"/runs/{RUN['slug']}").text

    edit = f"/runs/{RUN['slug']}/edit"
    html = client.get(edit).text
    assert "<option>yes</option><option selected>no</option>" in html, "the form shows what is stored"
    form = {**form, "recipe_version": "1", "compression": "none", "visibility": "public", "join_policy": "open"}
    form = {**form, "max_peers": "0", "status": "open"}
    refused = client.post(edit, data={**form, "inner_steps": "100001", "overlap": "perhaps"})
    assert 'id="e-inner_steps"' in refused.text and 'id="e-overlap"' in refused.text
    assert client.get(f"/api/runs/{RUN['slug']}").json()["inner_steps"] == 64, "a refused form saves nothing"
    saved = client.post(edit, data={**form, "inner_steps": "1000", "overlap": "yes"})
    assert saved.url.path.endswith("/manage"), saved.text
    run = client.get(f"/api/runs/{RUN['slug']}").json()
    assert (run["inner_steps"], run["overlap"]) == (1000, True)
    assert "averaging every 1,000 inner steps, overlapping training" in client.get(f"/runs/{RUN['slug']}").text
    client.cookies.clear()


def _execute(database_url: str, *statements: str) -> list[tuple]:
    """Runs the statements in one transaction; the rows of the last one."""

    async def run() -> list[tuple]:
        engine = create_engine(database_url)
        async with engine.begin() as connection:
            for statement in statements:
                result = await connection.execute(text(statement))
            rows = [tuple(row) for row in result] if result.returns_rows else []
        await engine.dispose()
        return rows

    return asyncio.run(run())


def _runs_after_0004(database_url: str) -> list[tuple[str, int, bool]]:
    """Upgrades a database holding one run made at 0003 to head, reads the run's diloco columns, and goes back."""
    upgrade(database_url, "0003")
    _execute(
        database_url,
        "INSERT INTO users (email, display_name, is_organizer, created_at) "
        "VALUES ('o@example.org', 'O', true, CURRENT_TIMESTAMP)",
        "INSERT INTO runs (slug, name, description, recipe, recipe_version, strategy, target_batch_size, group_size, "
        "compression, visibility, join_policy, owner_id, created_at, updated_at) VALUES ('old', 'Old', '', "
        "'tiny-lm', '1', 'diloco', 64, 4, 'none', 'public', 'open', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
    )
    upgrade(database_url)
    found = [(slug, steps, bool(overlap)) for slug, steps, overlap in _execute(database_url, SELECT_DILOCO)]
    downgrade(database_url, "0003")
    assert _execute(database_url, "SELECT slug FROM runs") == [("old",)], "downgrading keeps the run"
    upgrade(database_url)
    return found


def test_0004_fills_existing_runs_on_sqlite(tmp_path: Path) -> None:
    assert _runs_after_0004(f"sqlite:///{tmp_path / 'old.db'}") == [("old", 500, True)]


def test_0004_fills_existing_runs_on_postgresql() -> None:
    name = "hw_migration_0004_test"
    _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    try:
        assert _runs_after_0004(_postgres_url(name)) == [("old", 500, True)]
    finally:
        _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
