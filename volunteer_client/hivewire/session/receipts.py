"""Round receipts: after an averaging round its members co-sign what each contributed (docs/protocol.md).

The server's leaderboard counts only **verified samples**: those a whole group signed. Two control records
go between the members of a round over their links, after the butterfly:

1. ``receipt_claim`` {round_id, epoch, samples, certificate}: each member tells the others the samples it
   averaged with (its butterfly weight) and its current peer certificate;
2. ``receipt_signature`` {round_id, signature}: a member that holds every claim, each checked, signs the
   receipt body (run, round, epoch, members -> samples) and sends its signature to the others.

A member that then holds every signature, each verified with the signer's certified key, has the receipt
the server stores; every member queues it for upload and the server stores it once (later uploads are
answered "duplicate"), so the receipt survives any single member leaving.

Before signing, a member checks each claim: the certificate verifies for this run and names the sender,
and the claimed samples agree with what the butterfly averaged: for every shard whose mean this member got,
the claims of that shard's contributors sum to the total weight its reducer used. A member therefore
cannot claim more samples than it put into the round. A round with a failure (an excluded member, a claim
or signature missing by the deadline, any check failing) gets no receipt: nothing unverified is counted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hivewire.averaging import RoundReport
from hivewire.errors import CertificateError
from hivewire.identity import CertificateVerifier, PeerIdentity
from hivewire.mesh import ControlRecordError, LinkError, Mesh, RecordSchema
from hivewire.reporter import receipt_signing_bytes, sign_receipt

logger = logging.getLogger(__name__)

RECEIPT_TIMEOUT_S = 10.0  # from the end of our butterfly until every claim and signature must be in
MAX_PENDING_ROUNDS = 8  # rounds whose claims we accept at once; older ones are dropped
MAX_SAMPLES = 2**53  # the server's bound on a count
MAX_CERTIFICATE_CHARS = 4096
WEIGHT_TOLERANCE = 0.5  # claims are integers; the butterfly's float64 sums of them are exact below 2**53

_ROUND_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{86}")  # 64 bytes, base64url without padding


def _check_claim(record: Mapping[str, Any]) -> None:
    if not _ROUND_ID.fullmatch(record["round_id"]):
        raise ControlRecordError("receipt_claim.round_id: expected 8 to 64 of [A-Za-z0-9_-]")
    if not 0 <= record["epoch"] < 2**40 or not 0 <= record["samples"] <= MAX_SAMPLES:
        raise ControlRecordError(f"receipt_claim: epoch {record['epoch']} or samples {record['samples']} out of range")
    if not 0 < len(record["certificate"]) <= MAX_CERTIFICATE_CHARS:
        raise ControlRecordError(f"receipt_claim.certificate: 1 to {MAX_CERTIFICATE_CHARS} characters expected")


def _check_signature(record: Mapping[str, Any]) -> None:
    if not _ROUND_ID.fullmatch(record["round_id"]):
        raise ControlRecordError("receipt_signature.round_id: expected 8 to 64 of [A-Za-z0-9_-]")
    if not _SIGNATURE.fullmatch(record["signature"]):
        raise ControlRecordError("receipt_signature.signature: expected 86 base64url characters (64 bytes)")


RECEIPT_CLAIM = RecordSchema(
    "receipt_claim", {"round_id": str, "epoch": int, "samples": int, "certificate": str}, _check_claim
)
RECEIPT_SIGNATURE = RecordSchema("receipt_signature", {"round_id": str, "signature": str}, _check_signature)
RECEIPT_SCHEMAS = (RECEIPT_CLAIM, RECEIPT_SIGNATURE)


def receipt_round_id(run: str, group_round_id: str) -> str:
    """The receipt's id: the group's round id (a hash of epoch, members, attempt) bound to the run.

    The server keeps round ids unique across runs, and the same volunteers (same peer keys) may meet at the
    same epoch in two runs."""
    return hashlib.blake2b(f"hivewire-receipt\n{run}\n{group_round_id}".encode(), digest_size=16).hexdigest()


class ReceiptRefused(Exception):
    """A claim or signature failed a check; the round gets no receipt."""


@dataclass
class _Pending:
    """What we heard for one round, by sender; filled by records that may arrive before our butterfly ends."""

    claims: dict[str, dict[str, Any]] = field(default_factory=dict)
    signatures: dict[str, str] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


def _decode_signature(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "==")
    except (binascii.Error, ValueError) as exc:
        raise ReceiptRefused(f"undecodable signature: {exc}") from exc


def check_weights(report: RoundReport, claims: Mapping[str, int]) -> None:
    """Every shard's mean we got was averaged over exactly the contributors' claimed samples, or ReceiptRefused."""
    for reducer, contributors in report.contributors.items():
        unknown = sorted(set(contributors) - set(claims))
        if unknown:
            raise ReceiptRefused(f"shard of {reducer}: contributor {unknown[0]} has no claim (excluded or silent)")
        claimed = sum(claims[member] for member in contributors)
        total = report.total_weight[reducer]
        if abs(claimed - total) > WEIGHT_TOLERANCE:
            raise ReceiptRefused(
                f"shard of {reducer}: its contributors {list(contributors)} claim {claimed} samples, "
                f"its reducer averaged {total:g}"
            )


class ReceiptExchange:
    """Co-signs receipts with the members of our rounds; one per network process."""

    def __init__(
        self,
        mesh: Mesh,
        identity: PeerIdentity,
        certificate: Callable[[], str],
        verifier: CertificateVerifier,
        *,
        run: str,
        timeout_s: float = RECEIPT_TIMEOUT_S,
    ) -> None:
        self._mesh = mesh
        self._identity = identity
        self._certificate = certificate
        self._verifier = verifier
        self._run = run
        self._timeout_s = timeout_s
        self._pending: dict[str, _Pending] = {}
        mesh.on_records(("receipt_claim", "receipt_signature"), self._on_record)

    def expect(self, group_round_id: str) -> str:
        """Accept records for this round from now on (call when its group agreed); the receipt's round id."""
        rid = receipt_round_id(self._run, group_round_id)
        self._pending.setdefault(rid, _Pending())
        while len(self._pending) > MAX_PENDING_ROUNDS:
            dropped = next(iter(self._pending))
            del self._pending[dropped]
            logger.info("receipt of round %s dropped: too many rounds pending", dropped)
        return rid

    def forget(self, rid: str) -> None:
        self._pending.pop(rid, None)

    async def cosign(
        self, rid: str, *, epoch: int, members: tuple[str, ...], samples: int, report: RoundReport
    ) -> dict[str, Any] | None:
        """The receipt body for ``POST /receipts`` once every member signed, or None (logged) when there is none."""
        me = self._identity.peer_id
        others = tuple(member for member in members if member != me)
        pending = self._pending.setdefault(rid, _Pending())
        try:
            if not others:
                return None  # the server wants 2 members at least; a round alone verifies nothing
            own = {"type": "receipt_claim", "round_id": rid, "epoch": epoch, "samples": samples}
            self._broadcast(others, {**own, "certificate": self._certificate()})
            async with asyncio.timeout(self._timeout_s):
                await self._wait(pending, lambda: all(peer in pending.claims for peer in others))
                claims, certificates, keys = await self._check_claims(pending, others, epoch)
                claims[me], certificates[me] = samples, self._certificate()
                check_weights(report, claims)
                signature = sign_receipt(self._identity, run=self._run, round_id=rid, epoch=epoch, members=claims)
                self._broadcast(others, {"type": "receipt_signature", "round_id": rid, "signature": signature})
                await self._wait(pending, lambda: all(peer in pending.signatures for peer in others))
            message = receipt_signing_bytes(run=self._run, round_id=rid, epoch=epoch, members=claims)
            signatures = {me: signature}
            for peer in others:
                try:
                    Ed25519PublicKey.from_public_bytes(keys[peer]).verify(
                        _decode_signature(pending.signatures[peer]), message
                    )
                except InvalidSignature:
                    raise ReceiptRefused(f"{peer} signed other members or samples than ours") from None
                signatures[peer] = pending.signatures[peer]
        except TimeoutError:
            missing = [peer for peer in others if peer not in pending.claims or peer not in pending.signatures]
            logger.warning(
                "round %s (epoch %d): no receipt, %s did not co-sign within %s s", rid, epoch, missing, self._timeout_s
            )
            return None
        except ReceiptRefused as exc:
            logger.warning("round %s (epoch %d): no receipt: %s", rid, epoch, exc)
            return None
        finally:
            self.forget(rid)
        logger.info("round %s (epoch %d): receipt co-signed by %d members", rid, epoch, len(members))
        return {
            "round_id": rid,
            "epoch": epoch,
            "members": [
                {"peer_id": peer, "certificate": certificates[peer], "samples": claims[peer]} for peer in sorted(claims)
            ],
            "signatures": signatures,
        }

    async def _check_claims(
        self, pending: _Pending, others: tuple[str, ...], epoch: int
    ) -> tuple[dict[str, int], dict[str, str], dict[str, bytes]]:
        claims: dict[str, int] = {}
        certificates: dict[str, str] = {}
        keys: dict[str, bytes] = {}
        for peer in others:
            claim = pending.claims[peer]
            if claim["epoch"] != epoch:
                raise ReceiptRefused(f"{peer} claims epoch {claim['epoch']}, the round was epoch {epoch}")
            try:
                # The check may fetch the server's keys over blocking HTTP: keep it off the loop.
                verified = await asyncio.to_thread(self._verifier.verify, claim["certificate"], run=self._run)
            except CertificateError as exc:
                raise ReceiptRefused(f"the certificate {peer} sent does not verify: {exc}") from exc
            if verified.peer_id != peer:
                raise ReceiptRefused(f"{peer} sent the certificate of {verified.peer_id}")
            claims[peer], certificates[peer], keys[peer] = claim["samples"], claim["certificate"], verified.peer_key
        return claims, certificates, keys

    async def _wait(self, pending: _Pending, condition: Callable[[], bool]) -> None:
        while not condition():
            pending.changed.clear()
            await pending.changed.wait()

    def _broadcast(self, peers: tuple[str, ...], record: dict[str, Any]) -> None:
        for peer in peers:
            link = self._mesh.link(peer)
            if link is None:
                logger.info("no link to %s for the receipt of round %s", peer, record["round_id"])
                continue
            try:
                link.send_control(record)
            except LinkError as exc:
                logger.info("could not send the receipt %s to %s: %s", record["type"], peer, exc)

    def _on_record(self, sender: str, record: dict[str, Any]) -> None:
        pending = self._pending.get(record["round_id"])
        if pending is None:
            logger.info("dropped a %s from %s: round %s is not ours", record["type"], sender, record["round_id"])
            return
        if record["type"] == "receipt_claim":
            pending.claims.setdefault(sender, record)  # the first word counts: a member cannot change its claim
        else:
            pending.signatures.setdefault(sender, record["signature"])
        pending.changed.set()
