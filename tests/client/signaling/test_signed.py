"""Signed offers and answers: a genuine one is accepted; each way a relay or a peer can bend one is refused,
and the refusal names the check that caught it. SDP comes from real aiortc peer connections."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from hivewire.identity import CertificateVerifier
from hivewire.signaling import (
    DescriptionVerifier,
    SignalingAuthError,
    VerifiedDescription,
    fingerprints_from_sdp,
    sign_description,
)
from hivewire.signaling.signed import MAX_SDP_BYTES, NONCE_WINDOW_S
from tests.client._fakes import RUN
from tests.client.signaling._support import Member

_FINGERPRINT = re.compile(r"^a=fingerprint:[^\r\n]*", re.MULTILINE)
OTHER_DIGEST = ":".join(["AB"] * 32)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def alice(make_member: Callable[..., Member]) -> Member:
    return make_member()


@pytest.fixture
def bob(make_member: Callable[..., Member]) -> Member:
    return make_member()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def bob_verifier(cert_verifier: CertificateVerifier, bob: Member, clock: Clock) -> DescriptionVerifier:
    return DescriptionVerifier(cert_verifier, run=RUN, self_peer_id=bob.peer_id, clock=clock)


def signed_offer(sender: Member, receiver: Member, sdp: str, **overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {"kind": "offer", "sdp": sdp, "now": time.time(), **overrides}
    return sign_description(
        sender.identity, sender.certificate, sender=sender.peer_id, receiver=receiver.peer_id, **arguments
    )


def refused(verifier: DescriptionVerifier, sender: str, payload: Any, check: str, kind: str = "offer") -> str:
    with pytest.raises(SignalingAuthError) as info:
        verifier.verify(sender, kind, payload)
    assert info.value.check == check, str(info.value)
    return str(info.value)


def test_fingerprints_of_a_real_offer_are_normalised(offer_sdp: str) -> None:
    fingerprints = fingerprints_from_sdp(offer_sdp)
    assert [fingerprint.split()[0] for fingerprint in fingerprints] == ["sha-256", "sha-384", "sha-512"]
    for fingerprint in fingerprints:
        assert re.fullmatch(r"sha-\d+ [0-9A-F]{2}(:[0-9A-F]{2}){31,63}", fingerprint), fingerprint


def test_fingerprints_are_read_at_session_and_media_level(offer_sdp: str) -> None:
    session_level = offer_sdp.replace("\r\nt=0 0\r\n", f"\r\nt=0 0\r\na=fingerprint:SHA-256 {OTHER_DIGEST.lower()}\r\n")
    assert session_level != offer_sdp
    assert f"sha-256 {OTHER_DIGEST}" in fingerprints_from_sdp(session_level)
    assert len(fingerprints_from_sdp(session_level)) == len(fingerprints_from_sdp(offer_sdp)) + 1


@pytest.mark.parametrize(
    "line",
    [
        "a=fingerprint:sha-256",  # no digest
        "a=fingerprint:sha-256  AB:CD",  # two spaces
        "a=fingerprint:md5 AB:CD:EF",  # unknown hash
        f"a=fingerprint:sha-256 {OTHER_DIGEST}:CD",  # wrong length for the hash
        "a=fingerprint:sha-256 not-hex",
    ],
)
def test_malformed_fingerprints_are_refused(offer_sdp: str, line: str) -> None:
    with pytest.raises(ValueError, match="SDP line"):
        fingerprints_from_sdp(offer_sdp + line + "\r\n")


def test_sdp_without_fingerprint_is_refused(offer_sdp: str) -> None:
    with pytest.raises(ValueError, match="no a=fingerprint"):
        fingerprints_from_sdp(_FINGERPRINT.sub("a=setup:actpass", offer_sdp))


def test_accepts_a_good_offer(bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str) -> None:
    verified = bob_verifier.verify(alice.peer_id, "offer", signed_offer(alice, bob, offer_sdp))
    assert isinstance(verified, VerifiedDescription)
    assert verified.sdp == offer_sdp
    assert verified.certificate.peer_id == alice.peer_id
    assert verified.certificate.peer_key == alice.identity.public_key_raw


def test_refuses_a_swapped_certificate(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, make_member: Callable[..., Member], offer_sdp: str
) -> None:
    payload = signed_offer(alice, bob, offer_sdp)
    payload["certificate"] = make_member().certificate  # valid, but another peer's
    assert "carries the certificate of" in refused(bob_verifier, alice.peer_id, payload, "sender")


def test_refuses_a_certificate_from_another_run(
    bob_verifier: DescriptionVerifier, make_member: Callable[..., Member], bob: Member, offer_sdp: str
) -> None:
    mallory = make_member(run="other-run")
    refused(bob_verifier, mallory.peer_id, signed_offer(mallory, bob, offer_sdp), "certificate")


def test_refuses_an_expired_certificate(
    bob_verifier: DescriptionVerifier, make_member: Callable[..., Member], bob: Member, offer_sdp: str
) -> None:
    now = int(time.time())
    old = make_member(iat=now - 4000, exp=now - 60)
    assert "expired" in refused(bob_verifier, old.peer_id, signed_offer(old, bob, offer_sdp), "certificate")


def test_refuses_a_wrong_sender(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, make_member: Callable[..., Member], offer_sdp: str
) -> None:
    refused(bob_verifier, make_member().peer_id, signed_offer(alice, bob, offer_sdp), "sender")


def test_refuses_an_offer_signed_for_another_receiver(
    bob_verifier: DescriptionVerifier, alice: Member, make_member: Callable[..., Member], offer_sdp: str
) -> None:
    refused(bob_verifier, alice.peer_id, signed_offer(alice, make_member(), offer_sdp), "signature")


def test_refuses_an_answer_presented_as_an_offer(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str
) -> None:
    answer = signed_offer(alice, bob, offer_sdp, kind="answer")
    refused(bob_verifier, alice.peer_id, answer, "signature", kind="offer")


def test_refuses_a_bad_signature(bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str) -> None:
    payload = signed_offer(alice, bob, offer_sdp)
    payload["signature"] = ("A" if payload["signature"][0] != "A" else "B") + payload["signature"][1:]
    refused(bob_verifier, alice.peer_id, payload, "signature")


def test_refuses_a_re_signed_nonce(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str
) -> None:
    payload = signed_offer(alice, bob, offer_sdp)
    payload["nonce"] = signed_offer(alice, bob, offer_sdp)["nonce"]
    refused(bob_verifier, alice.peer_id, payload, "signature")


@pytest.mark.parametrize("age_s", [61, -61])
def test_refuses_a_timestamp_outside_60_seconds(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str, age_s: int
) -> None:
    payload = signed_offer(alice, bob, offer_sdp, now=time.time() - age_s)
    refused(bob_verifier, alice.peer_id, payload, "timestamp")


def test_refuses_a_replayed_nonce(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str, clock: Clock
) -> None:
    payload = signed_offer(alice, bob, offer_sdp)
    bob_verifier.verify(alice.peer_id, "offer", payload)
    refused(bob_verifier, alice.peer_id, payload, "replay")
    clock.now += 59  # still inside the timestamp window: the nonce is what catches it
    refused(bob_verifier, alice.peer_id, payload, "replay")


def test_nonces_are_forgotten_after_their_window(
    cert_verifier: CertificateVerifier, alice: Member, bob: Member, offer_sdp: str, clock: Clock
) -> None:
    verifier = DescriptionVerifier(cert_verifier, run=RUN, self_peer_id=bob.peer_id, clock=clock, max_nonces=2)
    for _ in range(2):
        verifier.verify(alice.peer_id, "offer", signed_offer(alice, bob, offer_sdp, now=clock.now))
    assert "refusing more" in refused(verifier, alice.peer_id, signed_offer(alice, bob, offer_sdp), "replay")
    clock.now += NONCE_WINDOW_S
    verifier.verify(alice.peer_id, "offer", signed_offer(alice, bob, offer_sdp, now=clock.now))


def test_a_refused_offer_does_not_burn_its_nonce(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str
) -> None:
    payload = signed_offer(alice, bob, offer_sdp)
    forged = {**payload, "signature": "A" * 86}
    refused(bob_verifier, alice.peer_id, forged, "signature")
    bob_verifier.verify(alice.peer_id, "offer", payload)


def test_refuses_an_altered_sdp_fingerprint(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str
) -> None:
    payload = signed_offer(alice, bob, offer_sdp)
    payload["sdp"] = _FINGERPRINT.sub(f"a=fingerprint:sha-256 {OTHER_DIGEST}", offer_sdp)
    refused(bob_verifier, alice.peer_id, payload, "fingerprints")


def test_refuses_altered_sdp_and_fingerprint_list(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str
) -> None:
    payload = signed_offer(alice, bob, offer_sdp)
    payload["sdp"] = _FINGERPRINT.sub(f"a=fingerprint:sha-256 {OTHER_DIGEST}", offer_sdp)
    payload["fingerprints"] = [f"sha-256 {OTHER_DIGEST}"]
    refused(bob_verifier, alice.peer_id, payload, "signature")


def test_refuses_an_sdp_with_an_extra_fingerprint(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str
) -> None:
    payload = signed_offer(alice, bob, offer_sdp)
    payload["sdp"] = offer_sdp + f"a=fingerprint:sha-256 {OTHER_DIGEST}\r\n"
    refused(bob_verifier, alice.peer_id, payload, "fingerprints")


def test_refuses_a_fingerprint_listed_twice(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str
) -> None:
    payload = signed_offer(alice, bob, offer_sdp)
    payload["fingerprints"] = payload["fingerprints"] * 2
    refused(bob_verifier, alice.peer_id, payload, "fingerprints")


def test_refuses_an_oversized_sdp(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str
) -> None:
    padded = offer_sdp + "a=x-padding:" + "x" * MAX_SDP_BYTES + "\r\n"
    assert "larger than" in refused(bob_verifier, alice.peer_id, signed_offer(alice, bob, padded), "payload")


def test_sdp_size_is_counted_in_bytes(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str
) -> None:
    padded = offer_sdp + "a=x-padding:" + "é" * (MAX_SDP_BYTES // 2) + "\r\n"
    assert len(padded) < MAX_SDP_BYTES < len(padded.encode())
    refused(bob_verifier, alice.peer_id, signed_offer(alice, bob, padded), "payload")


@pytest.mark.parametrize("field", ["sdp", "certificate", "fingerprints", "nonce", "timestamp", "signature"])
def test_refuses_a_missing_field(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str, field: str
) -> None:
    payload = signed_offer(alice, bob, offer_sdp)
    del payload[field]
    assert field in refused(bob_verifier, alice.peer_id, payload, "payload")


@pytest.mark.parametrize(
    ("field", "value"),
    [("timestamp", True), ("timestamp", "1764027480"), ("nonce", "short"), ("fingerprints", []), ("extra", 1)],
)
def test_refuses_malformed_fields(
    bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str, field: str, value: Any
) -> None:
    payload = signed_offer(alice, bob, offer_sdp)
    payload[field] = value
    refused(bob_verifier, alice.peer_id, payload, "payload")


@pytest.mark.parametrize("payload", [None, [], "offer", 1])
def test_refuses_a_payload_that_is_not_an_object(
    bob_verifier: DescriptionVerifier, alice: Member, payload: Any
) -> None:
    refused(bob_verifier, alice.peer_id, payload, "payload")


def test_refuses_unsigned_kinds(bob_verifier: DescriptionVerifier, alice: Member, bob: Member, offer_sdp: str) -> None:
    refused(bob_verifier, alice.peer_id, signed_offer(alice, bob, offer_sdp), "kind", kind="candidate")


def test_signer_refuses_what_it_cannot_sign(alice: Member, bob: Member, offer_sdp: str) -> None:
    with pytest.raises(ValueError, match="only offer and answer"):
        signed_offer(alice, bob, offer_sdp, kind="bye")
    with pytest.raises(ValueError, match="not this identity"):
        sign_description(
            alice.identity, alice.certificate, sender=bob.peer_id, receiver=bob.peer_id, kind="offer",
            sdp=offer_sdp, now=time.time(),
        )  # fmt: skip
    with pytest.raises(ValueError, match="no a=fingerprint"):
        signed_offer(alice, bob, _FINGERPRINT.sub("", offer_sdp))
