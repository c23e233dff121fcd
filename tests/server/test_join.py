"""Join and renew: the certificate verifies with the published JWKS and carries every claim; bans bite."""

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.core import keys
from tests.conftest import TURN_SECRET, Account, new_user, run_in_app


def new_peer_key() -> tuple[Ed25519PrivateKey, str]:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def expected_peer_id(peer_key: str) -> str:
    raw = base64.urlsafe_b64decode(peer_key + "=")
    return "p" + base64.b32encode(hashlib.sha256(raw).digest()).decode()[:24].lower()


def verify_with_jwks(client: TestClient, token: str) -> dict[str, object]:
    jwk_set = jwt.PyJWKSet.from_dict(client.get("/.well-known/jwks.json").json())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwk_set.keys if k.key_id == kid)
    return jwt.decode(
        token, key.key, algorithms=["EdDSA"], issuer="http://testserver", options={"require": ["exp", "iat"]}
    )


def join(client: TestClient, user: Account, slug: str, peer_key: str | None = None) -> dict:
    response = client.post(
        f"/api/runs/{slug}/join", json={"peer_key": peer_key or new_peer_key()[1]}, headers=user.headers
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_join_returns_a_certificate_verifiable_with_the_jwks(
    client: TestClient, volunteer: Account, run_slug: str
) -> None:
    _, peer_key = new_peer_key()
    before = int(time.time())
    body = join(client, volunteer, run_slug, peer_key)

    header = jwt.get_unverified_header(body["certificate"])
    assert header["alg"] == "EdDSA" and header["typ"] == "hivewire-peer+jwt"
    claims = verify_with_jwks(client, body["certificate"])
    assert set(claims) == {"iss", "sub", "run", "peer_id", "peer_key", "iat", "exp", "jti"}
    assert claims["iss"] == "http://testserver"
    assert claims["sub"] == str(volunteer.id)
    assert claims["run"] == run_slug
    assert claims["peer_key"] == peer_key
    assert claims["peer_id"] == body["peer_id"] == expected_peer_id(peer_key)
    assert before - 1 <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == 600
    assert len(str(claims["jti"])) >= 22
    expires_at = datetime.fromisoformat(body["certificate_expires_at"].replace("Z", "+00:00"))
    assert expires_at == datetime.fromtimestamp(claims["exp"], UTC)

    assert body["run"]["slug"] == run_slug and body["run"]["recipe"] == "tiny-lm"
    assert body["signaling_url"] == f"ws://testserver/api/runs/{run_slug}/signal"
    assert body["initial_peers"] == []


def test_jwks_publishes_an_rfc7638_kid(client: TestClient) -> None:
    (key,) = client.get("/.well-known/jwks.json").json()["keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["alg"] == "EdDSA"
    assert key["kid"] == keys.thumbprint(key)


def test_turn_credentials_follow_coturns_shared_secret_scheme(
    client: TestClient, volunteer: Account, run_slug: str
) -> None:
    body = join(client, volunteer, run_slug)
    stun, turn = body["ice_servers"]
    assert stun == {"urls": ["stun:127.0.0.1:3478"]}
    expiry, user = turn["username"].split(":")
    assert user == str(volunteer.id)
    assert int(expiry) == jwt.decode(body["certificate"], options={"verify_signature": False})["exp"]
    digest = hmac.new(TURN_SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
    assert turn["credential"] == base64.b64encode(digest).decode()


def test_initial_peers_are_the_peers_connected_to_signaling(
    client: TestClient, volunteer: Account, run_slug: str
) -> None:
    first = join(client, volunteer, run_slug)
    second = join(client, new_user(client, "wendy"), run_slug)
    assert second["initial_peers"] == [], "a peer that joined but never connected is not live"
    signal_url = f"/api/runs/{run_slug}/signal"
    with (
        client.websocket_connect(signal_url, headers={"Authorization": f"Bearer {first['certificate']}"}) as one,
        client.websocket_connect(signal_url, headers={"Authorization": f"Bearer {second['certificate']}"}) as two,
    ):
        assert one.receive_json()["type"] == two.receive_json()["type"] == "welcome"
        third = join(client, new_user(client, "xavier"), run_slug)
        assert sorted(third["initial_peers"]) == sorted([first["peer_id"], second["peer_id"]])
        again = join(client, volunteer, run_slug, None)  # a second key of the same user is a separate peer
        assert sorted(again["initial_peers"]) == sorted([first["peer_id"], second["peer_id"]])
        renewed = client.post(
            f"/api/runs/{run_slug}/renew", json={"certificate": first["certificate"]}, headers=volunteer.headers
        )
        assert renewed.json()["initial_peers"] == [second["peer_id"]], "never itself"


def test_renew_keeps_the_peer_and_issues_a_new_certificate(
    client: TestClient, volunteer: Account, run_slug: str
) -> None:
    body = join(client, volunteer, run_slug)
    renewed = client.post(
        f"/api/runs/{run_slug}/renew", json={"certificate": body["certificate"]}, headers=volunteer.headers
    )
    assert renewed.status_code == 200, renewed.text
    old, new = verify_with_jwks(client, body["certificate"]), verify_with_jwks(client, renewed.json()["certificate"])
    assert new["peer_id"] == old["peer_id"] and new["peer_key"] == old["peer_key"]
    assert new["jti"] != old["jti"]


def test_renew_refuses_someone_elses_certificate(client: TestClient, volunteer: Account, run_slug: str) -> None:
    body = join(client, volunteer, run_slug)
    other = new_user(client, "oscar")
    response = client.post(
        f"/api/runs/{run_slug}/renew", json={"certificate": body["certificate"]}, headers=other.headers
    )
    assert response.status_code == 403
    assert response.json()["code"] == "certificate_mismatch"


def test_renew_refuses_forged_and_expired_certificates(client: TestClient, volunteer: Account, run_slug: str) -> None:
    body = join(client, volunteer, run_slug)
    claims = jwt.decode(body["certificate"], options={"verify_signature": False})
    kid = jwt.get_unverified_header(body["certificate"])["kid"]
    forged = jwt.encode(
        claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": kid, "typ": "hivewire-peer+jwt"}
    )
    expired_claims = {**claims, "iat": claims["iat"] - 7200, "exp": claims["iat"] - 3600}

    async def sign_expired(session: AsyncSession) -> str:
        key = await keys.active_key(session)
        return jwt.encode(
            expired_claims, key.private_key, algorithm="EdDSA", headers={"kid": key.kid, "typ": "hivewire-peer+jwt"}
        )

    expired = run_in_app(client, sign_expired)
    for certificate, code in (
        (forged, "bad_certificate"),
        (expired, "expired_certificate"),
        ("x.y.z", "bad_certificate"),
    ):
        response = client.post(
            f"/api/runs/{run_slug}/renew", json={"certificate": certificate}, headers=volunteer.headers
        )
        assert response.status_code == 401, certificate
        assert response.json()["code"] == code


def test_banned_user_gets_403_on_join_and_renew(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    body = join(client, volunteer, run_slug)
    banned = client.post(
        f"/api/runs/{run_slug}/bans", json={"user_id": volunteer.id, "reason": "spam"}, headers=organizer.headers
    )
    assert banned.status_code == 201
    for path, payload in (("join", {"peer_key": new_peer_key()[1]}), ("renew", {"certificate": body["certificate"]})):
        response = client.post(f"/api/runs/{run_slug}/{path}", json=payload, headers=volunteer.headers)
        assert response.status_code == 403
        assert response.json()["code"] == "banned"
    client.delete(f"/api/runs/{run_slug}/bans/{volunteer.id}", headers=organizer.headers)
    join(client, volunteer, run_slug)


def test_only_organizers_ban(client: TestClient, organizer: Account, volunteer: Account, run_slug: str) -> None:
    response = client.post(f"/api/runs/{run_slug}/bans", json={"user_id": organizer.id}, headers=volunteer.headers)
    assert response.status_code == 403
    assert response.json()["code"] == "not_organizer"


def test_allowlist_runs_admit_only_invited_users(client: TestClient, organizer: Account, volunteer: Account) -> None:
    client.post(
        "/api/runs",
        json={
            "slug": "closed",
            "name": "Closed",
            "recipe": "tiny-lm",
            "target_batch_size": 64,
            "join_policy": "allowlist",
        },
        headers=organizer.headers,
    )
    refused = client.post("/api/runs/closed/join", json={"peer_key": new_peer_key()[1]}, headers=volunteer.headers)
    assert refused.status_code == 403 and refused.json()["code"] == "not_allowed"
    client.post("/api/runs/closed/allowlist", json={"user_id": volunteer.id}, headers=organizer.headers)
    join(client, volunteer, "closed")


def test_a_peer_key_cannot_be_taken_over_by_another_user(client: TestClient, volunteer: Account, run_slug: str) -> None:
    _, peer_key = new_peer_key()
    join(client, volunteer, run_slug, peer_key)
    thief = new_user(client, "trudy")
    response = client.post(f"/api/runs/{run_slug}/join", json={"peer_key": peer_key}, headers=thief.headers)
    assert response.status_code == 409
    assert response.json()["code"] == "peer_key_taken"


@pytest.mark.parametrize(
    "peer_key",
    [
        "A" * 43 + "=",
        "not base64!" + "A" * 32,
        "A" * 42,
        "A" * 44,
        "",
        "é" * 43,
    ],
)
def test_malformed_peer_keys_are_refused(client: TestClient, volunteer: Account, run_slug: str, peer_key: str) -> None:
    response = client.post(f"/api/runs/{run_slug}/join", json={"peer_key": peer_key}, headers=volunteer.headers)
    assert response.status_code in (400, 422)
    assert response.json()["code"] in ("bad_peer_key", "invalid_request")


def test_join_needs_a_valid_token_and_a_known_run(client: TestClient, volunteer: Account, run_slug: str) -> None:
    payload = {"peer_key": new_peer_key()[1]}
    assert client.post(f"/api/runs/{run_slug}/join", json=payload).status_code == 401
    forged = {"Authorization": "Bearer hw_" + "x" * 43}
    assert client.post(f"/api/runs/{run_slug}/join", json=payload, headers=forged).json()["code"] == "bad_token"
    assert (
        client.post(f"/api/runs/{run_slug}/join", json=payload, headers={"Authorization": "Basic abc"}).status_code
        == 401
    )
    unknown = client.post("/api/runs/no-such-run/join", json=payload, headers=volunteer.headers)
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_run"


def test_rotated_keys_keep_old_certificates_verifiable(client: TestClient, volunteer: Account, run_slug: str) -> None:
    before = join(client, volunteer, run_slug)
    new_kid = run_in_app(client, keys.rotate)
    after = join(client, volunteer, run_slug)
    assert jwt.get_unverified_header(after["certificate"])["kid"] == new_kid
    assert jwt.get_unverified_header(before["certificate"])["kid"] != new_kid
    verify_with_jwks(client, before["certificate"])
    verify_with_jwks(client, after["certificate"])
