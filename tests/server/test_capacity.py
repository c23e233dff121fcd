"""A run's limits on who trains: at most `max_peers` live peers at once (409 run_full), and a closed run that
admits nobody new and renews no certificate (403 run_closed)."""

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.core.timeutil import utcnow
from hivewire_server.models import Peer
from tests.conftest import Account, new_user, run_in_app
from tests.server.test_join import join, new_peer_key


def try_join(client: TestClient, user: Account, slug: str, peer_key: str | None = None) -> tuple[int, dict]:
    response = client.post(
        f"/api/runs/{slug}/join", json={"peer_key": peer_key or new_peer_key()[1]}, headers=user.headers
    )
    return response.status_code, response.json()


def limit(client: TestClient, organizer: Account, slug: str, **changes: object) -> None:
    response = client.patch(f"/api/runs/{slug}", json=changes, headers=organizer.headers)
    assert response.status_code == 200, response.text


def test_a_full_run_refuses_one_more_peer(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    limit(client, organizer, run_slug, max_peers=2)
    join(client, volunteer, run_slug)
    join(client, organizer, run_slug)
    status, body = try_join(client, new_user(client, "walter"), run_slug)
    assert status == 409
    assert body["code"] == "run_full"
    assert "2 peers are training" in body["detail"]


def test_a_live_peer_joining_again_keeps_its_place(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    limit(client, organizer, run_slug, max_peers=1)
    _, peer_key = new_peer_key()
    first = join(client, volunteer, run_slug, peer_key)
    assert join(client, volunteer, run_slug, peer_key)["peer_id"] == first["peer_id"]
    # The same volunteer's second machine is one peer more, and refused.
    assert try_join(client, volunteer, run_slug)[1]["code"] == "run_full"


def test_peers_gone_quiet_free_their_places(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    limit(client, organizer, run_slug, max_peers=1)
    join(client, volunteer, run_slug)
    assert try_join(client, organizer, run_slug)[0] == 409
    live_seconds = client.app.state.settings.peer_live_seconds  # type: ignore[attr-defined]

    async def silence(session: AsyncSession) -> None:
        await session.execute(update(Peer).values(last_seen_at=utcnow() - timedelta(seconds=live_seconds + 1)))

    run_in_app(client, silence)
    assert try_join(client, organizer, run_slug)[0] == 200


def test_zero_means_no_limit_and_the_limit_is_bounded(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    for _ in range(3):
        join(client, volunteer, run_slug)
    for bad in (-1, 100_001, "many"):
        response = client.patch(f"/api/runs/{run_slug}", json={"max_peers": bad}, headers=organizer.headers)
        assert response.status_code == 422, bad


def test_a_closed_run_refuses_joins_and_renewals_until_reopened(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    joined = join(client, volunteer, run_slug)
    limit(client, organizer, run_slug, status="closed")
    assert client.get(f"/api/runs/{run_slug}").json()["status"] == "closed"
    status, body = try_join(client, volunteer, run_slug)
    assert (status, body["code"]) == (403, "run_closed")
    renewal = client.post(
        f"/api/runs/{run_slug}/renew", json={"certificate": joined["certificate"]}, headers=volunteer.headers
    )
    assert (renewal.status_code, renewal.json()["code"]) == (403, "run_closed")
    limit(client, organizer, run_slug, status="open")
    assert try_join(client, volunteer, run_slug)[0] == 200


def test_a_ban_is_named_before_the_closing(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    """The banned volunteer learns the reason that lasts: reopening would not let them in."""
    client.post(f"/api/runs/{run_slug}/bans", json={"user_id": volunteer.id}, headers=organizer.headers)
    limit(client, organizer, run_slug, status="closed")
    assert try_join(client, volunteer, run_slug)[1]["code"] == "banned"


def test_only_open_and_closed_are_statuses(client: TestClient, organizer: Account, run_slug: str) -> None:
    response = client.patch(f"/api/runs/{run_slug}", json={"status": "paused"}, headers=organizer.headers)
    assert response.status_code == 422
    created = client.post(
        "/api/runs",
        json={"slug": "x-run", "name": "X", "recipe": "tiny-lm", "target_batch_size": 8, "status": "closed"},
        headers=organizer.headers,
    )
    assert created.status_code == 422, "a run is created open"
