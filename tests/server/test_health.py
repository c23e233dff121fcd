from fastapi.testclient import TestClient

from hivewire_server.main import create_app
from tests.conftest import make_settings


def test_healthz_reports_a_reachable_database(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_healthz_reports_an_unreachable_database() -> None:
    settings = make_settings("postgresql://nobody@127.0.0.1:9/none")
    with TestClient(create_app(settings)) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "degraded", "database": "unreachable"}
