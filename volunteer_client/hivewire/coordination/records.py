"""Wire records of coordination: signed progress records and matchmaking proposals (docs/protocol.md).

A progress record travels further than one link (neighbours re-gossip it), so the link's DTLS identity
does not say who wrote it: the author signs it with its peer key and attaches its certificate, and every
receiver checks both before believing a number in it. Cheap checks come first (schema, sizes, time), so a
flood of junk costs no signature check, and a certificate is verified once per peer and then cached.

Two versions of the progress record travel: ``progress_v2`` (what this client sends) adds the author's
measured link throughput to ``progress`` (v1), which is still accepted, with the throughput unknown. The
mesh's control codec takes exact field sets, so the new field comes as a new record type rather than an
optional field: older clients drop v2 records as an unknown type, newer ones read both.

A ``farewell`` is the author's signed "I left the run at ``time``", gossiped like progress: receivers drop
the author from their view at once instead of after ``record_expiration_s`` of silence, so a peer that left
at a later epoch stops making the others think they are behind (and stops being asked for its state).

A matchmaking proposal (and its acknowledgement) only ever crosses one direct link between two group members,
whose DTLS handshake already pinned the sender's certificate; it is not signed.
"""

import asyncio
import hashlib
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hivewire.averaging.partition import MAX_GROUP_SIZE
from hivewire.coordination.errors import RecordRefused
from hivewire.errors import CertificateError
from hivewire.identity import CLOCK_SKEW_S, MAX_CERTIFICATE_BYTES, CertificateVerifier, PeerCertificate, PeerIdentity
from hivewire.mesh import ControlCodec, ControlRecordError, RecordSchema

PROGRESS_DOMAIN = "hivewire-progress-v1"
PROGRESS_V2_DOMAIN = "hivewire-progress-v2"
FAREWELL_DOMAIN = "hivewire-farewell-v1"
ROUND_DOMAIN = "hivewire-round-v1"
MAX_EPOCH = 2**40
MAX_SAMPLES = 2**53  # integers beyond this stop being exact as floats in the estimates
MAX_SAMPLES_PER_SECOND = 1e9  # far above any volunteer; a larger claim is a lie or a bug
MAX_TIME = 2.0**40  # seconds since 1970: year ~36812; the skew window does the real check
MAX_GOSSIP_TTL = 8  # hops a record may still travel; a larger ttl is refused, not clamped
MAX_LINK_THROUGHPUT = 1e12  # bytes/s (8 Tbit/s): far above any volunteer's links
MAX_GROUP_MEMBERS = MAX_GROUP_SIZE  # a round's result names its contributors in a 64-bit mask
MAX_ATTEMPTS = 64
SIGNATURE_BYTES = 64
PEER_ID = re.compile(r"p[a-z2-7]{24}")
_PARAM_HASH = re.compile(r"[0-9a-f]{16,128}")
_ROUND_ID = re.compile(r"[0-9a-f]{32}")


def _in_range(record: Mapping[str, Any], name: str, low: float, high: float) -> None:
    value = record[name]
    if not (math.isfinite(value) and low <= value <= high):
        raise ControlRecordError(f"{record['type']}.{name}: {value!r} is outside {low}..{high}")


def _check_progress(record: Mapping[str, Any]) -> None:
    if not PEER_ID.fullmatch(record["peer_id"]):
        raise ControlRecordError(f"{record['type']}.peer_id: {record['peer_id'][:40]!r} is not a peer id")
    if record["type"] == "progress_v2":
        _in_range(record, "link_throughput", 0.0, MAX_LINK_THROUGHPUT)
    _in_range(record, "epoch", 0, MAX_EPOCH)
    _in_range(record, "samples_accumulated", 0, MAX_SAMPLES)
    _in_range(record, "samples_per_second", 0.0, MAX_SAMPLES_PER_SECOND)
    _in_range(record, "time", 0.0, MAX_TIME)
    _in_range(record, "ttl", 0, MAX_GOSSIP_TTL)
    param_hash = record["param_hash"]
    if param_hash is not None and not _PARAM_HASH.fullmatch(param_hash):
        raise ControlRecordError(f"{record['type']}.param_hash: expected 16 to 128 lowercase hex digits or nil")
    _check_signed(record)


def _check_farewell(record: Mapping[str, Any]) -> None:
    if not PEER_ID.fullmatch(record["peer_id"]):
        raise ControlRecordError(f"farewell.peer_id: {record['peer_id'][:40]!r} is not a peer id")
    _in_range(record, "time", 0.0, MAX_TIME)
    _in_range(record, "ttl", 0, MAX_GOSSIP_TTL)
    _check_signed(record)


def _check_signed(record: Mapping[str, Any]) -> None:
    certificate = record["certificate"]
    if not 0 < len(certificate) <= MAX_CERTIFICATE_BYTES or not certificate.isascii():
        raise ControlRecordError(f"{record['type']}.certificate: expected 1..{MAX_CERTIFICATE_BYTES} ASCII characters")
    if len(record["signature"]) != SIGNATURE_BYTES:
        raise ControlRecordError(
            f"{record['type']}.signature: expected {SIGNATURE_BYTES} bytes, got {len(record['signature'])}"
        )


def _check_proposal(record: Mapping[str, Any]) -> None:
    _in_range(record, "epoch", 0, MAX_EPOCH)
    _in_range(record, "attempt", 0, MAX_ATTEMPTS)
    members = record["members"]
    if not 0 < len(members) <= MAX_GROUP_MEMBERS:
        raise ControlRecordError(f"match_propose.members: expected 1..{MAX_GROUP_MEMBERS} peers, got {len(members)}")
    if not all(type(member) is str and PEER_ID.fullmatch(member) for member in members):
        raise ControlRecordError("match_propose.members: expected a list of peer ids")
    if members != sorted(set(members)):
        raise ControlRecordError("match_propose.members: expected sorted peer ids without repeats")
    if record["round_id"] != round_id(record["epoch"], members, record["attempt"]):
        raise ControlRecordError("match_propose.round_id: not the hash of (epoch, members, attempt)")
    _in_range(record, "throughput", 0.0, MAX_LINK_THROUGHPUT)


def _check_ack(record: Mapping[str, Any]) -> None:
    _in_range(record, "epoch", 0, MAX_EPOCH)
    _in_range(record, "attempt", 0, MAX_ATTEMPTS)
    if not _ROUND_ID.fullmatch(record["round_id"]):
        raise ControlRecordError("match_ack.round_id: expected 32 lowercase hex digits")


_PROGRESS_FIELDS: dict[str, type | tuple[type, ...]] = {
    "peer_id": str,
    "epoch": int,
    "samples_accumulated": int,
    "samples_per_second": float,
    "time": float,
    "param_hash": (str, type(None)),
    "certificate": str,
    "signature": bytes,
    "ttl": int,
}
PROGRESS = RecordSchema("progress", _PROGRESS_FIELDS, _check_progress)  # v1: accepted, no longer sent
PROGRESS_V2 = RecordSchema("progress_v2", {**_PROGRESS_FIELDS, "link_throughput": float}, _check_progress)
PROGRESS_TYPES = ("progress", "progress_v2")
FAREWELL = RecordSchema(
    "farewell",
    {"peer_id": str, "time": float, "certificate": str, "signature": bytes, "ttl": int},
    _check_farewell,
)
PROPOSAL = RecordSchema(
    "match_propose",
    {"round_id": str, "epoch": int, "attempt": int, "members": list, "throughput": float},
    _check_proposal,
)
# "I am alive and have your proposal": sent by a member that has not proposed this (epoch, attempt) to the sender.
ACK = RecordSchema("match_ack", {"round_id": str, "epoch": int, "attempt": int}, _check_ack)
# Register these in the mesh's ControlCodec so links accept them.
COORDINATION_SCHEMAS = (PROGRESS, PROGRESS_V2, FAREWELL, PROPOSAL, ACK)


def round_id(epoch: int, members: Iterable[str], attempt: int) -> str:
    """blake2b-128 of (epoch, sorted members, attempt): equal only when the whole membership is equal."""
    text = "\n".join((ROUND_DOMAIN, str(epoch), str(attempt), ",".join(sorted(members))))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Progress:
    """What one peer says about itself: where it is in the run and how fast it goes."""

    peer_id: str
    epoch: int  # averaging rounds this peer's parameters went through
    samples_accumulated: int  # samples processed towards the next round, in this epoch
    samples_per_second: float  # recent local throughput
    time: float  # when the numbers were taken, seconds since 1970 (the author's clock)
    param_hash: str | None = None  # hex digest of the parameters, for divergence checks under dedloc
    link_throughput: float = 0.0  # bytes/s, its best link's recent payload rate; 0 when unknown (or a v1 record)


def _canonical(run: str, progress: Progress, *, version: int) -> bytes:
    """The exact bytes that are signed (docs/protocol.md); floats as their shortest round-trip decimal."""
    fields = [
        PROGRESS_V2_DOMAIN if version == 2 else PROGRESS_DOMAIN,
        run,
        progress.peer_id,
        str(progress.epoch),
        str(progress.samples_accumulated),
        repr(float(progress.samples_per_second)),
        repr(float(progress.time)),
        progress.param_hash or "",
    ]
    if version == 2:
        fields.append(repr(float(progress.link_throughput)))
    return "\n".join(fields).encode("utf-8")


def sign_progress(
    identity: PeerIdentity, certificate_token: str, progress: Progress, *, run: str, ttl: int
) -> dict[str, Any]:
    """The wire record (v2) of our own progress, signed with our peer key, to travel ``ttl`` more hops."""
    if progress.peer_id != identity.peer_id:
        raise ValueError(f"progress of {progress.peer_id} cannot be signed by {identity.peer_id}")
    return {
        "type": "progress_v2",
        "peer_id": progress.peer_id,
        "epoch": progress.epoch,
        "samples_accumulated": progress.samples_accumulated,
        "samples_per_second": float(progress.samples_per_second),
        "time": float(progress.time),
        "param_hash": progress.param_hash,
        "link_throughput": float(progress.link_throughput),
        "certificate": certificate_token,
        "signature": identity.private_key.sign(_canonical(run, progress, version=2)),
        "ttl": ttl,
    }


@dataclass(frozen=True)
class Farewell:
    """A peer's word that it left the run at ``time`` (its clock)."""

    peer_id: str
    time: float


def _farewell_canonical(run: str, farewell: Farewell) -> bytes:
    return "\n".join((FAREWELL_DOMAIN, run, farewell.peer_id, repr(float(farewell.time)))).encode("utf-8")


def sign_farewell(identity: PeerIdentity, certificate_token: str, *, run: str, time: float, ttl: int) -> dict[str, Any]:
    """The wire record saying we left ``run`` at ``time``, signed with our peer key, to travel ``ttl`` more hops."""
    farewell = Farewell(identity.peer_id, float(time))
    return {
        "type": "farewell",
        "peer_id": farewell.peer_id,
        "time": farewell.time,
        "certificate": certificate_token,
        "signature": identity.private_key.sign(_farewell_canonical(run, farewell)),
        "ttl": ttl,
    }


class ProgressVerifier:
    """Checks progress records of ``run``: schema, time window, certificate (cached per peer), signature.

    ``max_age_s`` is how old a record may be (it expires from the view then anyway); ``max_future_s`` how
    far ahead of our clock its time may lie (clocks disagree by that much at most). Certificates are verified
    in a worker thread, since the verifier may fetch the server's keys over blocking HTTP.
    """

    def __init__(
        self,
        certificates: CertificateVerifier,
        *,
        run: str,
        max_age_s: float,
        max_future_s: float,
        max_peers: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._certificates = certificates
        self._run = run
        self._max_age_s = max_age_s
        self._max_future_s = max_future_s
        self._max_peers = max_peers
        self._clock = clock
        self._codec = ControlCodec(COORDINATION_SCHEMAS)
        self._verified: dict[str, PeerCertificate] = {}  # peer id -> its last verified certificate

    def _validate(self, record: Any) -> None:
        try:
            self._codec.validate(record)
        except ControlRecordError as exc:
            raise RecordRefused("schema", str(exc)) from exc

    def check_farewell_schema(self, record: Any) -> Farewell:
        """A farewell's author and time once its shape passed; RecordRefused("schema") otherwise."""
        self._validate(record)
        if record["type"] != "farewell":
            raise RecordRefused("schema", f"expected a farewell record, got {record['type']!r}")
        return Farewell(record["peer_id"], record["time"])

    async def verify_farewell(self, record: Any) -> Farewell:
        """Every check of a farewell, as of a progress record: schema, time window, certificate, signature."""
        farewell = self.check_farewell_schema(record)
        await self._check_signed(record, farewell.peer_id, farewell.time, _farewell_canonical(self._run, farewell))
        return farewell

    def check_schema(self, record: Any) -> Progress:
        """The record's numbers once its shape, sizes and ranges passed; RecordRefused("schema") otherwise."""
        self._validate(record)
        if record["type"] not in PROGRESS_TYPES:
            raise RecordRefused("schema", f"expected a progress record, got {record['type']!r}")
        return Progress(
            peer_id=record["peer_id"],
            epoch=record["epoch"],
            samples_accumulated=record["samples_accumulated"],
            samples_per_second=record["samples_per_second"],
            time=record["time"],
            param_hash=record["param_hash"],
            link_throughput=record.get("link_throughput", 0.0),
        )

    async def verify(self, record: Any) -> Progress:
        """Every check, cheapest first; RecordRefused names the first that fails."""
        progress = self.check_schema(record)
        version = 2 if record["type"] == "progress_v2" else 1
        await self._check_signed(
            record, progress.peer_id, progress.time, _canonical(self._run, progress, version=version)
        )
        return progress

    async def _check_signed(self, record: Any, peer_id: str, at: float, signed: bytes) -> None:
        """The time window, the author's certificate and its signature over ``signed``, in that order."""
        now = self._clock()
        if at > now + self._max_future_s:
            raise RecordRefused(
                "time",
                f"{peer_id} dated its record {at - now:.1f} s ahead of our clock; "
                f"allowed {self._max_future_s} s (check both clocks if this repeats)",
            )
        if at < now - self._max_age_s:
            raise RecordRefused("stale", f"{peer_id}'s record is {now - at:.1f} s old; max_age_s={self._max_age_s}")
        certificate = await self._certificate(peer_id, record["certificate"], now)
        try:
            Ed25519PublicKey.from_public_bytes(certificate.peer_key).verify(record["signature"], signed)
        except InvalidSignature as exc:
            raise RecordRefused(
                "signature", f"the record of {peer_id} does not verify with its certificate's key"
            ) from exc

    async def _certificate(self, peer_id: str, token: str, now: float) -> PeerCertificate:
        """The certificate of ``peer_id``: the cached one if ``token`` is it and still valid, else verified anew."""
        cached = self._verified.get(peer_id)
        if cached is not None and cached.token == token and cached.expires_at.timestamp() + CLOCK_SKEW_S > now:
            return cached
        try:
            certificate = await asyncio.to_thread(self._certificates.verify, token, run=self._run)
        except CertificateError as exc:
            raise RecordRefused("certificate", f"record of {peer_id}: {exc}") from exc
        if certificate.peer_id != peer_id:
            raise RecordRefused("certificate", f"record of {peer_id} carries the certificate of {certificate.peer_id}")
        if peer_id not in self._verified and len(self._verified) >= self._max_peers:
            self._verified.pop(next(iter(self._verified)))  # the longest-cached peer verifies again if it returns
        self._verified[peer_id] = certificate
        return certificate
