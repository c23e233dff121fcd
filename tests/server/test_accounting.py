"""Reports and round receipts: good ones counted once, forged, replayed, malformed and absurd ones refused with
a reason, recorded for the organizer, and never counted."""

from __future__ import annotations

import math
import time

import jwt
from fastapi.testclient import TestClient
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from hivewire_server.core import keys
from hivewire_server.models import Peer
from tests.conftest import RUN, Account, run_in_app
from tests.server._accounting import joined, leaderboard, post_receipt, post_reports, receipt
from tests.server.test_join import new_peer_key


def other_run(client: TestClient, organizer: Account) -> str:
    response = client.post("/api/runs", json={**RUN, "slug": "other-run"}, headers=organizer.headers)
    assert response.status_code == 201, response.text
    return "other-run"


def test_reports_are_counted_once_however_often_they_are_sent(
    client: TestClient, volunteer: Account, run_slug: str
) -> None:
    peer = joined(client, volunteer, run_slug)
    now = time.time()
    first, second = peer.report(samples=100, time=now - 20), peer.report(samples=50, time=now - 5)

    response = post_reports(client, run_slug, peer, [first, second])
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": [first["report_id"], second["report_id"]], "duplicate": [], "refused": []}

    third = peer.report(samples=7, time=now)
    body = post_reports(client, run_slug, peer, [first, second, third, third]).json()
    assert body == {
        "accepted": [third["report_id"]],
        "duplicate": [first["report_id"], second["report_id"], third["report_id"]],
        "refused": [],
    }
    row = leaderboard(client, run_slug)[volunteer.id]
    assert row["reported_samples"] == 157
    assert row["online_seconds"] == 20.0  # the gaps between its reports: 15 s, then 5 s
    assert row["verified_samples"] == 0 and row["rounds"] == 0


def test_a_report_may_list_its_links_with_their_measured_rates(
    client: TestClient, volunteer: Account, run_slug: str
) -> None:
    """The links field is signed when present and optional (older clients omit it); it is kept with the report."""
    peer = joined(client, volunteer, run_slug)
    now = time.time()
    links = [{"type": "direct_tls", "bytes_per_s": 4.1e8}, {"type": "relay", "bytes_per_s": 0.0}]
    with_links, without = peer.report(links=links, time=now - 2), peer.report(time=now - 1)
    tampered = peer.report(links=links, time=now)
    tampered["links"] = [{"type": "direct_tls", "bytes_per_s": 9e11}, links[1]]
    body = post_reports(client, run_slug, peer, [with_links, without, tampered]).json()
    assert body["accepted"] == [with_links["report_id"], without["report_id"]], body
    assert [refusal["reason"] for refusal in body["refused"]] == ["bad_signature"]


def test_bad_reports_are_refused_one_by_one_with_a_reason(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    peer, stranger = joined(client, volunteer, run_slug), joined(client, organizer, run_slug)
    good = peer.report()
    tampered = peer.report()
    tampered["samples"] += 1
    missing = peer.report()
    del missing["loss"]
    cases = {
        "forged": (peer.report(key=new_peer_key()[0]), "bad_signature"),
        "tampered": (tampered, "bad_signature"),
        "another peer's": (stranger.report(), "wrong_peer"),
        "missing field": (missing, "malformed"),
        "negative": (peer.report(samples=-1), "malformed"),
        "NaN loss": (peer.report(loss=math.nan), "malformed"),
        "infinite rate": (peer.report(samples_per_second=math.inf), "malformed"),
        "float count": (peer.report(samples=3.0), "malformed"),
        "not a uuid": (peer.report(report_id="1"), "malformed"),
        "unknown link type": (peer.report(links=[{"type": "carrier-pigeon", "bytes_per_s": 1.0}]), "malformed"),
        "negative link rate": (peer.report(links=[{"type": "host", "bytes_per_s": -1.0}]), "malformed"),
        "NaN link rate": (peer.report(links=[{"type": "relay", "bytes_per_s": math.nan}]), "malformed"),
        "too many links": (peer.report(links=[{"type": "host", "bytes_per_s": 1.0}] * 65), "malformed"),
        "absurd samples": (peer.report(samples=10**12), "implausible_samples"),
        "absurd rate": (peer.report(samples_per_second=1e9), "implausible_rate"),
        "future": (peer.report(time=time.time() + 3600), "in_the_future"),
        "ancient": (peer.report(time=time.time() - 30 * 86400), "too_old"),
    }
    response = post_reports(client, run_slug, peer, [good] + [report for report, _ in cases.values()])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["accepted"] == [good["report_id"]] and body["duplicate"] == []
    reasons = [refusal["reason"] for refusal in body["refused"]]
    assert reasons == [reason for _, reason in cases.values()], list(zip(cases, reasons, strict=True))
    assert all(refusal["detail"] for refusal in body["refused"])
    assert body["refused"][0]["report_id"] == cases["forged"][0]["report_id"]

    late = post_reports(client, run_slug, peer, [peer.report(time=good["time"] - 1)]).json()
    assert [refusal["reason"] for refusal in late["refused"]] == ["out_of_order"]
    assert leaderboard(client, run_slug)[volunteer.id]["reported_samples"] == good["samples"]

    failures = client.get(f"/api/runs/{run_slug}/verification-failures", headers=organizer.headers)
    assert failures.status_code == 200, failures.text
    rows = failures.json()["data"]
    assert len(rows) == len(cases) + 1
    assert {row["kind"] for row in rows} == {"report"} and {row["user_id"] for row in rows} == {volunteer.id}
    assert rows[0]["reason"] == "out_of_order"
    refused = client.get(f"/api/runs/{run_slug}/verification-failures", headers=volunteer.headers)
    assert refused.status_code == 403


def test_a_batch_without_a_valid_peer_certificate_is_refused_whole(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    peer = joined(client, volunteer, run_slug)
    elsewhere = joined(client, volunteer, other_run(client, organizer))
    reports = {"reports": [peer.report()]}
    url = f"/api/runs/{run_slug}/reports"

    def refused(headers: dict[str, str], body: dict = reports) -> tuple[int, str]:
        response = client.post(url, json=body, headers=headers)
        return response.status_code, response.json()["code"]

    assert refused({}) == (401, "bad_certificate")
    assert refused(volunteer.headers) == (401, "bad_certificate")  # an API token is not a peer credential
    assert refused({"Authorization": f"Bearer {peer.certificate[:-4]}AAAA"}) == (401, "bad_certificate")
    assert refused(elsewhere.headers) == (403, "wrong_run")
    assert refused(peer.headers, {"reports": [peer.report() for _ in range(101)]}) == (400, "batch_too_large")

    client.post(f"/api/runs/{run_slug}/bans", json={"user_id": volunteer.id}, headers=organizer.headers)
    assert refused(peer.headers) == (403, "banned")
    client.delete(f"/api/runs/{run_slug}/bans/{volunteer.id}", headers=organizer.headers)

    async def forget(session: AsyncSession) -> None:
        await session.execute(delete(Peer).where(Peer.peer_id == peer.peer_id))

    run_in_app(client, forget)
    assert refused(peer.headers) == (401, "unknown_peer")
    assert volunteer.id not in leaderboard(client, run_slug)


def test_a_receipt_signed_by_every_member_is_stored_once(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    alice, bob = joined(client, organizer, run_slug), joined(client, volunteer, run_slug)
    body = receipt(run_slug, [(alice, 300), (bob, 500)])

    stored = post_receipt(client, run_slug, bob, body)
    assert stored.status_code == 201, stored.text
    assert stored.json() == {"round_id": "round-0001", "status": "stored"}
    again = post_receipt(client, run_slug, alice, body)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    conflicting = post_receipt(client, run_slug, alice, receipt(run_slug, [(alice, 900), (bob, 500)]))
    assert conflicting.status_code == 409 and conflicting.json()["code"] == "conflicting_receipt"

    post_receipt(client, run_slug, alice, receipt(run_slug, [(alice, 10), (bob, 20)], round_id="round-0002"))
    rows = leaderboard(client, run_slug)
    assert rows[volunteer.id] | {"display_name": ""} == {
        "rank": 1,
        "user_id": volunteer.id,
        "display_name": "",
        "verified_samples": 520,
        "reported_samples": 0,
        "online_seconds": 0.0,
        "rounds": 2,
    }
    assert rows[organizer.id]["rank"] == 2 and rows[organizer.id]["verified_samples"] == 310
    assert rows[organizer.id]["display_name"] == "olivia"


def test_bad_receipts_are_refused_and_count_nothing(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    alice, bob = joined(client, organizer, run_slug), joined(client, volunteer, run_slug)
    carol = joined(client, volunteer, other_run(client, organizer))
    unsigned = receipt(run_slug, [(alice, 1), (bob, 2)])
    del unsigned["signatures"][bob.peer_id]
    forged = receipt(run_slug, [(alice, 1), (bob, 2)])
    forged["signatures"][bob.peer_id] = alice.sign_receipt(run_slug, "round-0001", 3, [(alice.peer_id, 1)])
    swapped = receipt(run_slug, [(alice, 1), (bob, 2)])
    swapped["members"][1]["certificate"] = alice.certificate
    other_run_signed = receipt("other-run", [(alice, 1), (bob, 2)])
    cases = [
        (alice, unsigned, 400, "missing_signature"),
        (alice, forged, 400, "bad_signature"),
        (alice, other_run_signed, 400, "bad_signature"),
        (alice, swapped, 400, "member_wrong_peer"),
        (alice, receipt(run_slug, [(alice, 1), (carol, 2)]), 400, "member_wrong_run"),
        (alice, receipt(run_slug, [(alice, 1), (bob, 10**12)]), 400, "implausible_samples"),
        (alice, receipt(run_slug, [(alice, 1), (alice, 2)]), 400, "duplicate_member"),
        (carol, receipt(run_slug, [(alice, 1), (bob, 2)]), 403, "wrong_run"),  # not recorded: not this run's peer
    ]
    for uploader, body, status, code in cases:
        response = post_receipt(client, run_slug, uploader, body)
        assert (response.status_code, response.json()["code"]) == (status, code), response.text

    bystander = joined(client, organizer, run_slug)
    response = post_receipt(client, run_slug, bystander, receipt(run_slug, [(alice, 1), (bob, 2)]))
    assert (response.status_code, response.json()["code"]) == (403, "not_a_member")
    assert all(row["verified_samples"] == 0 for row in leaderboard(client, run_slug).values())
    failures = client.get(f"/api/runs/{run_slug}/verification-failures", headers=organizer.headers).json()
    assert sorted(row["reason"] for row in failures["data"]) == sorted(
        [code for _, _, _, code in cases[:-1]] + ["not_a_member"]
    )
    assert {row["kind"] for row in failures["data"]} == {"receipt"}


def test_a_member_certificate_counts_for_a_day_after_it_expired(
    client: TestClient, organizer: Account, volunteer: Account, run_slug: str
) -> None:
    alice, bob = joined(client, organizer, run_slug), joined(client, volunteer, run_slug)
    claims = jwt.decode(bob.certificate, options={"verify_signature": False})

    def expired_since(seconds: int) -> str:
        async def sign(session: AsyncSession) -> str:
            key = await keys.active_key(session)
            late = {**claims, "iat": claims["iat"] - seconds - 600, "exp": claims["iat"] - seconds}
            header = {"kid": key.kid, "typ": "hivewire-peer+jwt"}
            return jwt.encode(late, key.private_key, algorithm="EdDSA", headers=header)

        return run_in_app(client, sign)

    bob.certificate = expired_since(2 * 86400)
    response = post_receipt(client, run_slug, alice, receipt(run_slug, [(alice, 1), (bob, 2)]))
    assert (response.status_code, response.json()["code"]) == (400, "member_expired_certificate")
    bob.certificate = expired_since(3600)
    response = post_receipt(client, run_slug, alice, receipt(run_slug, [(alice, 1), (bob, 2)]))
    assert response.status_code == 201, response.text
    assert leaderboard(client, run_slug)[volunteer.id]["verified_samples"] == 2
