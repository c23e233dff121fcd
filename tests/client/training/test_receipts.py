"""Round receipts co-signed by a group's members (session/receipts.py): what they sign and what they refuse.

The members talk through an in-memory stand-in for the mesh's links that still encodes and decodes every
record with the real ControlCodec (so schema checks apply); certificates are minted by a test server key and
checked by the real CertificateVerifier; the signed bytes are checked with the server's own code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivewire.averaging import RoundReport, plan_partition
from hivewire.identity import CertificateVerifier, PeerIdentity
from hivewire.mesh import ControlCodec, ControlRecordError
from hivewire.session.receipts import RECEIPT_SCHEMAS, ReceiptExchange, ReceiptRefused, check_weights
from hivewire_server.accounting import receipt_signing_bytes, signature_valid
from tests.client._fakes import RUN, SERVER, JWKSServer, SigningKey, b64url, raw_public

CODEC = ControlCodec(RECEIPT_SCHEMAS)


class Link:
    """Delivers control records to the peer's handlers on the next loop turn, through the real codec."""

    def __init__(self, sender: str, receiver: Mesh) -> None:
        self.sender, self.receiver = sender, receiver

    def send_control(self, record: dict[str, Any]) -> None:
        decoded = CODEC.decode(CODEC.encode(record))
        asyncio.get_running_loop().call_soon(self.receiver.deliver, self.sender, decoded)


class Mesh:
    """The two calls ReceiptExchange makes of a mesh: register handlers, get a link."""

    def __init__(self, me: str, network: dict[str, Mesh]) -> None:
        self.me, self.network = me, network
        self.handlers: dict[str, Callable[[str, dict[str, Any]], None]] = {}
        self.silent = False  # drops everything it would send

    def on_records(self, types: Collection[str], handler: Callable[[str, dict[str, Any]], None]) -> None:
        self.handlers.update(dict.fromkeys(types, handler))

    def link(self, peer: str) -> Link | None:
        return None if self.silent or peer not in self.network else Link(self.me, self.network[peer])

    def deliver(self, sender: str, record: dict[str, Any]) -> None:
        self.handlers[record["type"]](sender, record)


class Member:
    def __init__(self, key: SigningKey, jwks: JWKSServer, network: dict[str, Mesh]) -> None:
        private = Ed25519PrivateKey.generate()
        self.identity = PeerIdentity(private_key=private, public_key_raw=raw_public(private))
        self.peer_id = self.identity.peer_id
        self.certificate = key.mint(self.identity.public_key_raw)
        self.mesh = network[self.peer_id] = Mesh(self.peer_id, network)
        self.verifier = CertificateVerifier(SERVER, http=jwks.client())
        self.exchange = ReceiptExchange(
            self.mesh,  # type: ignore[arg-type]
            self.identity,
            lambda: self.certificate,
            self.verifier,
            run=RUN,
            timeout_s=1.0,
        )


@pytest.fixture
def members() -> Iterator[list[Member]]:
    key = SigningKey()
    jwks = JWKSServer(key)
    network: dict[str, Mesh] = {}
    group = [Member(key, jwks, network) for _ in range(3)]
    yield sorted(group, key=lambda member: member.peer_id)
    for member in group:
        member.verifier.close()


def report(me: str, weights: dict[str, int]) -> RoundReport:
    """What a clean butterfly reports: every shard averaged over every member, with the sum of their weights."""
    members = tuple(sorted(weights))
    partition = plan_partition(300, {member: 1.0 for member in members})
    return RoundReport(
        round_id="r",
        me=me,
        partition=partition,
        contributors={member: members for member in members},
        total_weight={member: float(sum(weights.values())) for member in members},
        excluded={},
        kept_local=(),
        averaged_fraction=1.0,
        bytes_sent=0,
        bytes_received=0,
        duration_s=0.0,
    )


async def cosign(group: list[Member], claims: dict[str, int], averaged: dict[str, int]) -> list[Any]:
    """Every member co-signs one round; ``claims`` is what each says, ``averaged`` what the butterfly saw."""
    members = tuple(member.peer_id for member in group)
    ids = [member.exchange.expect("group-round-0001") for member in group]
    assert len(set(ids)) == 1 and ids[0] != "group-round-0001"  # bound to the run, the same for all
    return await asyncio.gather(
        *(
            member.exchange.cosign(
                ids[0],
                epoch=7,
                members=members,
                samples=claims[member.peer_id],
                report=report(member.peer_id, averaged),
            )
            for member in group
        )
    )


async def test_every_member_gets_the_same_receipt_that_the_server_verifies(members: list[Member]) -> None:
    weights = {member.peer_id: 100 + n for n, member in enumerate(members)}
    receipts = await cosign(members, weights, weights)
    assert receipts[0] is not None and all(receipt == receipts[0] for receipt in receipts)
    receipt = receipts[0]
    assert [entry["peer_id"] for entry in receipt["members"]] == sorted(weights)
    assert {entry["peer_id"]: entry["samples"] for entry in receipt["members"]} == weights
    message = receipt_signing_bytes(
        run=RUN, round_id=receipt["round_id"], epoch=7, members=[(peer, weights[peer]) for peer in weights]
    )
    for member in members:
        entry = next(entry for entry in receipt["members"] if entry["peer_id"] == member.peer_id)
        assert entry["certificate"] == member.certificate
        assert signature_valid(b64url(member.identity.public_key_raw), receipt["signatures"][member.peer_id], message)


async def test_a_member_claiming_more_than_it_averaged_gets_no_receipt_signed(
    members: list[Member], caplog: pytest.LogCaptureFixture
) -> None:
    averaged = {member.peer_id: 100 for member in members}
    claims = {**averaged, members[2].peer_id: 5000}  # the butterfly's totals say 300, the claims 5200
    with caplog.at_level(logging.WARNING, logger="hivewire.session.receipts"):
        assert await cosign(members, claims, averaged) == [None, None, None]
    assert "claim 5200 samples, its reducer averaged 300" in caplog.text


async def test_a_member_with_another_peers_certificate_gets_no_receipt(
    members: list[Member], caplog: pytest.LogCaptureFixture
) -> None:
    members[1].certificate = members[0].certificate
    weights = {member.peer_id: 10 for member in members}
    with caplog.at_level(logging.WARNING, logger="hivewire.session.receipts"):
        receipts = await cosign(members, weights, weights)
    assert receipts[0] is None and receipts[2] is None
    assert f"{members[1].peer_id} sent the certificate of {members[0].peer_id}" in caplog.text


async def test_a_silent_member_means_no_receipt_within_the_deadline(
    members: list[Member], caplog: pytest.LogCaptureFixture
) -> None:
    members[2].mesh.silent = True
    weights = {member.peer_id: 10 for member in members}
    with caplog.at_level(logging.WARNING, logger="hivewire.session.receipts"):
        assert await cosign(members, weights, weights) == [None, None, None]
    assert f"'{members[2].peer_id}'] did not co-sign within 1.0 s" in caplog.text


async def test_records_of_rounds_we_are_not_in_are_dropped(members: list[Member]) -> None:
    first, second = members[0], members[1]
    record = {"type": "receipt_claim", "round_id": "not-our-round", "epoch": 1, "samples": 3, "certificate": "x"}
    second.mesh.link(first.peer_id).send_control(record)  # type: ignore[union-attr]
    await asyncio.sleep(0)
    rid = first.exchange.expect("group-round-0002")
    assert "not-our-round" not in first.exchange._pending and rid in first.exchange._pending


def test_the_weight_check_needs_a_claim_for_every_contributor() -> None:
    with pytest.raises(ReceiptRefused, match="contributor b has no claim"):
        check_weights(report("a", {"a": 1, "b": 2}), {"a": 1})


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"round_id": "short", "epoch": 1, "samples": 1, "certificate": "x"}, "round_id"),
        ({"round_id": "round-0001", "epoch": 1, "samples": 2**54, "certificate": "x"}, "out of range"),
        ({"round_id": "round-0001", "epoch": 1, "samples": 1, "certificate": "x" * 5000}, "certificate"),
    ],
)
def test_claims_out_of_bounds_are_refused_by_the_codec(record: dict[str, Any], message: str) -> None:
    with pytest.raises(ControlRecordError, match=message):
        CODEC.validate({"type": "receipt_claim", **record})


def test_a_signature_of_the_wrong_size_is_refused_by_the_codec() -> None:
    with pytest.raises(ControlRecordError, match="86 base64url"):
        CODEC.validate({"type": "receipt_signature", "round_id": "round-0001", "signature": "A" * 40})
