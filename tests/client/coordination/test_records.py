"""Progress records: what a receiver believes, and everything it refuses before believing a number."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from hivewire.coordination import Progress, ProgressVerifier, RecordRefused, sign_progress
from hivewire.identity import CertificateVerifier
from tests.client._fakes import RUN, JWKSServer
from tests.client.coordination._support import Clock, Member

MAX_AGE_S = 60.0
MAX_FUTURE_S = 10.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(cert_verifier: CertificateVerifier, clock: Clock) -> ProgressVerifier:
    return ProgressVerifier(
        cert_verifier, run=RUN, max_age_s=MAX_AGE_S, max_future_s=MAX_FUTURE_S, max_peers=16, clock=clock
    )


def progress_of(member: Member, clock: Clock, **fields: Any) -> Progress:
    values: dict[str, Any] = {
        "peer_id": member.peer_id,
        "epoch": 3,
        "samples_accumulated": 120,
        "samples_per_second": 40.5,
        "time": clock(),
        "param_hash": "ab" * 16,
    }
    values.update(fields)
    return Progress(**values)


def signed(member: Member, clock: Clock, **fields: Any) -> dict[str, Any]:
    return sign_progress(member.identity, member.certificate, progress_of(member, clock, **fields), run=RUN, ttl=2)


async def refused_by(verifier: ProgressVerifier, record: dict[str, Any]) -> str:
    with pytest.raises(RecordRefused) as caught:
        await verifier.verify(record)
    return caught.value.check


async def test_a_signed_record_is_accepted_with_its_numbers(
    verifier: ProgressVerifier, make_member: Callable[..., Member], clock: Clock
) -> None:
    member = make_member()
    assert await verifier.verify(signed(member, clock)) == progress_of(member, clock)
    assert (await verifier.verify(signed(member, clock, param_hash=None))).param_hash is None


async def test_a_certificate_is_fetched_and_verified_once_per_peer(
    verifier: ProgressVerifier, make_member: Callable[..., Member], clock: Clock, jwks: JWKSServer
) -> None:
    member = make_member()
    for step in range(20):
        clock.now += 1
        await verifier.verify(signed(member, clock, samples_accumulated=step))
    assert jwks.requests == 1


async def test_a_forged_signature_is_refused(
    verifier: ProgressVerifier, make_member: Callable[..., Member], clock: Clock
) -> None:
    record = signed(make_member(), clock)
    record["samples_accumulated"] += 1_000_000  # a relay inflating someone's contribution
    assert await refused_by(verifier, record) == "signature"
    record = signed(make_member(), clock)
    record["signature"] = bytes(64)
    assert await refused_by(verifier, record) == "signature"


async def test_a_record_signed_for_another_run_is_refused(
    verifier: ProgressVerifier, make_member: Callable[..., Member], clock: Clock
) -> None:
    member = make_member()
    record = sign_progress(member.identity, member.certificate, progress_of(member, clock), run="other-run", ttl=0)
    assert await refused_by(verifier, record) == "signature"


async def test_another_peers_certificate_is_refused(
    verifier: ProgressVerifier, make_member: Callable[..., Member], clock: Clock
) -> None:
    author, other = make_member(), make_member()
    record = signed(author, clock)
    record["certificate"] = other.certificate
    assert await refused_by(verifier, record) == "certificate"
    # The other peer's key cannot sign in the author's name either, with the author's certificate.
    forged = sign_progress(other.identity, author.certificate, progress_of(other, clock), run=RUN, ttl=0)
    forged["peer_id"] = author.peer_id
    assert await refused_by(verifier, forged) == "signature"


@pytest.mark.parametrize("claims", [{"run": "other-run"}, {"exp": 1_000}, {"iss": "http://evil.test"}])
async def test_an_invalid_certificate_is_refused(
    verifier: ProgressVerifier, make_member: Callable[..., Member], clock: Clock, claims: dict[str, Any]
) -> None:
    assert await refused_by(verifier, signed(make_member(**claims), clock)) == "certificate"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("samples_per_second", math.nan),
        ("samples_per_second", math.inf),
        ("samples_per_second", -1.0),
        ("samples_per_second", 1e12),
        ("samples_accumulated", -5),
        ("samples_accumulated", 2**60),
        ("epoch", -1),
        ("epoch", True),
        ("time", math.nan),
        ("time", -1.0),
        ("samples_per_second", 3),
        ("ttl", 9),
        ("param_hash", "XYZ"),
        ("param_hash", "a" * 129),
        ("certificate", "x" * 5000),
        ("certificate", ""),
        ("signature", bytes(65)),
        ("peer_id", "not-a-peer"),
    ],
)
async def test_malformed_records_are_refused_before_any_crypto(
    verifier: ProgressVerifier,
    make_member: Callable[..., Member],
    clock: Clock,
    jwks: JWKSServer,
    field: str,
    value: Any,
) -> None:
    record = signed(make_member(), clock)
    record[field] = value
    assert await refused_by(verifier, record) == "schema"
    assert jwks.requests == 0


@pytest.mark.parametrize("change", ["extra", "missing", "not a map"])
async def test_records_of_the_wrong_shape_are_refused(
    verifier: ProgressVerifier, make_member: Callable[..., Member], clock: Clock, change: str
) -> None:
    record: Any = signed(make_member(), clock)
    if change == "extra":
        record["loss"] = 0.5
    elif change == "missing":
        del record["param_hash"]
    else:
        record = [record]
    assert await refused_by(verifier, record) == "schema"


async def test_far_future_and_stale_times_are_refused(
    verifier: ProgressVerifier, make_member: Callable[..., Member], clock: Clock
) -> None:
    member = make_member()
    assert await refused_by(verifier, signed(member, clock, time=clock() + MAX_FUTURE_S + 1)) == "time"
    assert await refused_by(verifier, signed(member, clock, time=clock() - MAX_AGE_S - 1)) == "stale"
    await verifier.verify(signed(member, clock, time=clock() + MAX_FUTURE_S - 1))  # skew inside the window


def test_only_the_author_can_sign_its_progress(make_member: Callable[..., Member], clock: Clock) -> None:
    author, other = make_member(), make_member()
    with pytest.raises(ValueError, match="cannot be signed"):
        sign_progress(other.identity, other.certificate, progress_of(author, clock), run=RUN, ttl=0)


async def test_a_v2_record_carries_the_link_throughput_under_its_signature(
    verifier: ProgressVerifier, make_member: Callable[..., Member], clock: Clock
) -> None:
    member = make_member()
    record = signed(member, clock, link_throughput=2.5e6)
    assert record["type"] == "progress_v2"
    assert (await verifier.verify(record)).link_throughput == 2.5e6
    assert await refused_by(verifier, {**record, "link_throughput": 9.9e6}) == "signature"  # a forwarder's lie


def signed_v1(member: Member, progress: Progress) -> dict[str, Any]:
    """A record as clients before link_throughput sent it, signed over the v1 bytes of docs/protocol.md."""
    text = "\n".join(
        (
            "hivewire-progress-v1",
            RUN,
            progress.peer_id,
            str(progress.epoch),
            str(progress.samples_accumulated),
            repr(progress.samples_per_second),
            repr(progress.time),
            progress.param_hash or "",
        )
    )
    fields = {name: getattr(progress, name) for name in ("peer_id", "epoch", "samples_accumulated", "time")}
    return {
        "type": "progress",
        **fields,
        "samples_per_second": progress.samples_per_second,
        "param_hash": progress.param_hash,
        "certificate": member.certificate,
        "signature": member.identity.private_key.sign(text.encode()),
        "ttl": 1,
    }


async def test_an_older_clients_v1_record_is_accepted_with_the_throughput_unknown(
    verifier: ProgressVerifier, make_member: Callable[..., Member], clock: Clock
) -> None:
    member = make_member()
    progress = progress_of(member, clock)
    assert await verifier.verify(signed_v1(member, progress)) == progress
    assert progress.link_throughput == 0.0
    v2_signature = signed(member, clock)["signature"]  # the v2 bytes differ: no signature passes for the other
    assert await refused_by(verifier, {**signed_v1(member, progress), "signature": v2_signature}) == "signature"


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, 2e12])
async def test_a_link_throughput_outside_its_bounds_is_refused(
    verifier: ProgressVerifier, make_member: Callable[..., Member], clock: Clock, value: float
) -> None:
    record = signed(make_member(), clock)
    record["link_throughput"] = value
    assert await refused_by(verifier, record) == "schema"
