"""Peers that sign reports and receipts the way docs/protocol.md spells it, written here apart from the server's
code so the tests check the documented bytes, not the server against itself."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from httpx import Response

from tests.conftest import Account
from tests.server.test_join import join, new_peer_key


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class SigningPeer:
    account: Account
    key: Ed25519PrivateKey
    peer_id: str
    certificate: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.certificate}"}

    def report(self, *, key: Ed25519PrivateKey | None = None, **fields: Any) -> dict[str, Any]:
        """A signed report; `fields` override the defaults before signing, `key` signs with another key."""
        body: dict[str, Any] = {
            "report_id": str(uuid.uuid4()),
            "peer_id": self.peer_id,
            "epoch": 1,
            "samples": 64,
            "loss": 2.5,
            "samples_per_second": 32.0,
            "link_types": {"host": 1, "srflx": 1, "relay": 0, "direct_tls": 0},
            "client_version": "0.1.0",
            "device_kind": "cpu",
            "time": time.time(),
        }
        body.update(fields)
        signature = (key or self.key).sign(b"hivewire-report-v1\n" + canonical(body))
        return {**body, "signature": b64url(signature)}

    def sign_receipt(self, slug: str, round_id: str, epoch: int, members: list[tuple[str, int]]) -> str:
        message = {"run": slug, "round_id": round_id, "epoch": epoch, "members": [list(m) for m in sorted(members)]}
        return b64url(self.key.sign(b"hivewire-receipt-v1\n" + canonical(message)))


def joined(client: TestClient, account: Account, slug: str) -> SigningPeer:
    key, peer_key = new_peer_key()
    body = join(client, account, slug, peer_key)
    return SigningPeer(account=account, key=key, peer_id=body["peer_id"], certificate=body["certificate"])


def post_reports(client: TestClient, slug: str, peer: SigningPeer, reports: list[dict[str, Any]]) -> Response:
    """Encoded by hand: Python's json writes NaN and Infinity, as a hostile client would; httpx refuses to."""
    headers = {**peer.headers, "Content-Type": "application/json"}
    return client.post(f"/api/runs/{slug}/reports", content=json.dumps({"reports": reports}), headers=headers)


def receipt(slug: str, members: list[tuple[SigningPeer, int]], *, round_id: str = "round-0001", epoch: int = 3) -> dict:
    """A receipt every member signed."""
    pairs = [(peer.peer_id, samples) for peer, samples in members]
    return {
        "round_id": round_id,
        "epoch": epoch,
        "members": [
            {"peer_id": peer.peer_id, "certificate": peer.certificate, "samples": samples} for peer, samples in members
        ],
        "signatures": {peer.peer_id: peer.sign_receipt(slug, round_id, epoch, pairs) for peer, _ in members},
    }


def post_receipt(client: TestClient, slug: str, uploader: SigningPeer, body: dict[str, Any]) -> Response:
    return client.post(f"/api/runs/{slug}/receipts", json=body, headers=uploader.headers)


def leaderboard(client: TestClient, slug: str) -> dict[int, dict[str, Any]]:
    response = client.get(f"/api/runs/{slug}/leaderboard")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["data"])
    return {row["user_id"]: row for row in body["data"]}
