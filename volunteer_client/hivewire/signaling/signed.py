"""End-to-end authentication of offers and answers (docs/protocol.md, "Signed offers and answers").

The server, or a neighbour relaying signaling, only moves envelopes; it must not be able to stand in the
middle of a link. So the sender signs, with its peer key, who it is, whom the description is for, its kind,
the DTLS fingerprints of its SDP, a nonce and the time, and attaches its peer certificate. The receiver
applies a remote description only after `DescriptionVerifier.verify` accepted it; DTLS then pins the
peer's certificate to the signed fingerprints, so whoever completes the handshake holds the peer key.
"""

from __future__ import annotations

import base64
import binascii
import collections
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from hivewire.errors import CertificateError
from hivewire.identity import MAX_CERTIFICATE_BYTES, CertificateVerifier, PeerCertificate, PeerIdentity
from hivewire.signaling.errors import SignalingAuthError

__all__ = [
    "MAX_SDP_BYTES",
    "NONCE_WINDOW_S",
    "SIGNED_KINDS",
    "TIMESTAMP_WINDOW_S",
    "DescriptionVerifier",
    "VerifiedDescription",
    "fingerprints_from_sdp",
    "sign_description",
]

SIGNED_KINDS = ("offer", "answer")
DOMAIN = "hivewire-signal-v1"
MAX_SDP_BYTES = 64 * 1024
# aiortc offers one fingerprint per certificate; a few more leave room for other implementations.
MAX_FINGERPRINTS = 8
# A description signed further than this from our clock is refused (stale, replayed, or a broken clock).
TIMESTAMP_WINDOW_S = 60
# Nonces are remembered this long: twice the timestamp window, so a replay is caught on either side of it.
NONCE_WINDOW_S = 120
# Bounds the memory of remembered nonces; past it new descriptions are refused until old nonces expire.
MAX_REMEMBERED_NONCES = 65_536
NONCE_BYTES = 16
# Digest sizes of the hash names of RFC 8122 (the SDP fingerprint attribute).
_DIGEST_BYTES = {"sha-1": 20, "sha-224": 28, "sha-256": 32, "sha-384": 48, "sha-512": 64}
_FINGERPRINT_LINE = re.compile(r"a=fingerprint:([A-Za-z0-9-]+) ((?:[0-9A-Fa-f]{2}:)*[0-9A-Fa-f]{2})")
_FINGERPRINT = r"^(sha-1|sha-224|sha-256|sha-384|sha-512) [0-9A-F]{2}(:[0-9A-F]{2}){19,63}$"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def fingerprints_from_sdp(sdp: str) -> list[str]:
    """Every DTLS fingerprint of `sdp`, session and media level, as sorted unique "algo HEX:HEX" strings.

    Lines are split as aiortc splits them (`str.splitlines`), and every line that could be read as a
    fingerprint must parse strictly, so no fingerprint aiortc would apply escapes this list. Raises
    ValueError for an SDP without one, or with one that is malformed.
    """
    found: set[str] = set()
    for number, line in enumerate(sdp.splitlines(), start=1):
        if not line.lower().startswith("a=fingerprint"):
            continue
        match = _FINGERPRINT_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"SDP line {number} is a malformed fingerprint: {line[:120]!r}")
        algorithm, digest = match[1].lower(), match[2].upper()
        if algorithm not in _DIGEST_BYTES or digest.count(":") + 1 != _DIGEST_BYTES[algorithm]:
            raise ValueError(f"SDP line {number}: not a {algorithm} digest of the right length: {line[:120]!r}")
        found.add(f"{algorithm} {digest}")
    if not found:
        raise ValueError("SDP carries no a=fingerprint line, so DTLS could not pin the peer")
    return sorted(found)


def _canonical(sender: str, receiver: str, kind: str, fingerprints: list[str], nonce: str, timestamp: int) -> bytes:
    """The exact bytes that are signed (docs/protocol.md)."""
    fields = (DOMAIN, sender, receiver, kind, ",".join(sorted(fingerprints)), nonce, str(timestamp))
    return "\n".join(fields).encode("utf-8")


def sign_description(
    identity: PeerIdentity,
    certificate_token: str,
    *,
    sender: str,
    receiver: str,
    kind: str,
    sdp: str,
    now: float,
    nonce: str | None = None,
) -> dict[str, Any]:
    """The signed payload of an offer or answer from `sender` (this peer) to `receiver`."""
    if kind not in SIGNED_KINDS:
        raise ValueError(f"only {' and '.join(SIGNED_KINDS)} are signed, not {kind!r}")
    if sender != identity.peer_id:
        raise ValueError(f"sender {sender!r} is not this identity's peer id {identity.peer_id!r}")
    fingerprints = fingerprints_from_sdp(sdp)
    nonce = nonce if nonce is not None else _b64url(secrets.token_bytes(NONCE_BYTES))
    timestamp = int(now)
    signature = identity.private_key.sign(_canonical(sender, receiver, kind, fingerprints, nonce, timestamp))
    return {
        "sdp": sdp,
        "certificate": certificate_token,
        "fingerprints": fingerprints,
        "nonce": nonce,
        "timestamp": timestamp,
        "signature": _b64url(signature),
    }


class _SignedPayload(BaseModel):
    """The payload as it must arrive: nothing unsigned rides along (extra fields are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    sdp: Annotated[str, StringConstraints(min_length=1, max_length=MAX_SDP_BYTES)]
    certificate: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CERTIFICATE_BYTES)]
    fingerprints: list[Annotated[str, StringConstraints(pattern=_FINGERPRINT)]] = Field(
        min_length=1, max_length=MAX_FINGERPRINTS
    )
    nonce: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{22}$")]
    timestamp: int = Field(ge=0, le=2**40)
    signature: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{86}$")]


@dataclass(frozen=True)
class VerifiedDescription:
    """A description that passed every check: apply exactly this `sdp`, from the holder of `certificate`."""

    sdp: str
    certificate: PeerCertificate


class DescriptionVerifier:
    """Checks signed offers and answers addressed to `self_peer_id` in `run`.

    Cheap checks come first, so a flood of junk costs no JWKS lookup. A nonce is remembered only once
    everything else passed, so a forged message cannot burn the nonce of a genuine one. Thread-safe, so
    `verify` may run in a worker thread (the certificate check can fetch the server's keys, blocking).
    """

    def __init__(
        self,
        cert_verifier: CertificateVerifier,
        *,
        run: str,
        self_peer_id: str,
        clock: Callable[[], float] = time.time,
        max_nonces: int = MAX_REMEMBERED_NONCES,
    ) -> None:
        self._certificates = cert_verifier
        self._run = run
        self._self = self_peer_id
        self._clock = clock
        self._max_nonces = max_nonces
        self._nonces: set[str] = set()
        self._nonce_times: collections.deque[tuple[float, str]] = collections.deque()
        self._lock = threading.Lock()

    def verify(self, sender: str, kind: str, payload: Any) -> VerifiedDescription:
        """Every check of docs/protocol.md; `SignalingAuthError.check` names the first that fails."""
        if kind not in SIGNED_KINDS:
            raise SignalingAuthError("kind", f"{kind!r} from {sender} is not a signed kind ({SIGNED_KINDS})")
        signed = self._parse(payload)
        now = self._clock()
        if abs(signed.timestamp - now) > TIMESTAMP_WINDOW_S:
            raise SignalingAuthError(
                "timestamp",
                f"{kind} from {sender} signed at {signed.timestamp}, {signed.timestamp - now:+.0f} s from our "
                f"clock; allowed ±{TIMESTAMP_WINDOW_S} s (check both clocks if this repeats)",
            )
        self._check_fingerprints(signed, sender, kind)
        try:
            certificate = self._certificates.verify(signed.certificate, run=self._run)
        except CertificateError as exc:
            raise SignalingAuthError("certificate", f"{kind} from {sender}: {exc}") from exc
        if certificate.peer_id != sender:
            raise SignalingAuthError("sender", f"{kind} from {sender} carries the certificate of {certificate.peer_id}")
        message = _canonical(sender, self._self, kind, signed.fingerprints, signed.nonce, signed.timestamp)
        try:
            signature = base64.urlsafe_b64decode(signed.signature + "==")
            Ed25519PublicKey.from_public_bytes(certificate.peer_key).verify(signature, message)
        except (InvalidSignature, binascii.Error, ValueError) as exc:
            raise SignalingAuthError(
                "signature",
                f"{kind} from {sender} to {self._self}: the signature does not verify; the description was "
                "altered, or signed for another receiver",
            ) from exc
        self._remember_nonce(signed.nonce, now, sender, kind)
        return VerifiedDescription(sdp=signed.sdp, certificate=certificate)

    def _parse(self, payload: Any) -> _SignedPayload:
        if not isinstance(payload, dict):
            raise SignalingAuthError("payload", f"expected a JSON object, got {type(payload).__name__}")
        sdp = payload.get("sdp")
        if isinstance(sdp, str) and len(sdp.encode("utf-8", "surrogatepass")) > MAX_SDP_BYTES:
            raise SignalingAuthError("payload", f"the SDP is larger than {MAX_SDP_BYTES} bytes")
        try:
            return _SignedPayload.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "payload"
            raise SignalingAuthError("payload", f"field {where!r}: {first['msg']}") from exc

    def _check_fingerprints(self, signed: _SignedPayload, sender: str, kind: str) -> None:
        """The fingerprints DTLS will pin (those in the SDP to apply) must be exactly the signed ones."""
        if len(set(signed.fingerprints)) != len(signed.fingerprints):
            raise SignalingAuthError("fingerprints", f"{kind} from {sender} lists a fingerprint twice")
        try:
            in_sdp = fingerprints_from_sdp(signed.sdp)
        except ValueError as exc:
            raise SignalingAuthError("fingerprints", f"{kind} from {sender}: {exc}") from exc
        if in_sdp != sorted(signed.fingerprints):
            raise SignalingAuthError(
                "fingerprints",
                f"{kind} from {sender}: the SDP carries {in_sdp}, but {sorted(signed.fingerprints)} were signed",
            )

    def _remember_nonce(self, nonce: str, now: float, sender: str, kind: str) -> None:
        with self._lock:
            while self._nonce_times and self._nonce_times[0][0] <= now - NONCE_WINDOW_S:
                self._nonces.discard(self._nonce_times.popleft()[1])
            if nonce in self._nonces:
                raise SignalingAuthError("replay", f"{kind} from {sender}: nonce {nonce} was already used")
            if len(self._nonces) >= self._max_nonces:
                raise SignalingAuthError(
                    "replay",
                    f"{kind} from {sender}: {self._max_nonces} descriptions accepted in {NONCE_WINDOW_S} s; "
                    "refusing more until older nonces expire",
                )
            self._nonces.add(nonce)
            self._nonce_times.append((now, nonce))
