"""The volunteer's Ed25519 peer key, and verification of the peer certificates the server signs for such keys.

A certificate binds a peer key to a user and a run (docs/protocol.md, "Peer certificate"). Peers accept each
other only through it, so every check lives here, once: size, header, signing key, signature, claims.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hivewire.config import normalize_server_url, private_dir
from hivewire.errors import CertificateError, ConfigError, IdentityError, InvalidResponse, ServerUnreachable

__all__ = [
    "CertificateVerifier",
    "PeerCertificate",
    "PeerIdentity",
    "decode_peer_key",
    "encode_peer_key",
    "load_or_create_identity",
    "peer_id_from_key",
]

logger = logging.getLogger(__name__)

CERTIFICATE_TYPE = "hivewire-peer+jwt"
CLOCK_SKEW_S = 30
# A real certificate is ~600 bytes; the bound keeps a hostile one from costing parse time or memory.
MAX_CERTIFICATE_BYTES = 4096
MAX_JWKS_BYTES = 64 * 1024
MAX_JWKS_KEYS = 32
MAX_KEY_FILE_BYTES = 4096
# An unknown kid refetches the JWKS at most this often, so a flood of bogus kids cannot hammer the server.
MIN_REFETCH_INTERVAL_S = 10.0
# Cached keys are refreshed after this long, so a key the server withdrew stops being trusted.
JWKS_MAX_AGE_S = 3600.0
REQUIRED_CLAIMS = ("iss", "sub", "run", "peer_id", "peer_key", "iat", "exp", "jti")
_PEER_ID = re.compile(r"p[a-z2-7]{24}")
_KID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_JTI = re.compile(r"[A-Za-z0-9_-]{22,128}")
_USER_ID = re.compile(r"[1-9][0-9]{0,18}")


def encode_peer_key(raw: bytes) -> str:
    """A 32-byte public key as base64url without padding (43 characters), as it travels on the wire."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_peer_key(text: str) -> bytes:
    """The 32 raw bytes of a wire peer key; refuses any other length or a non-canonical spelling."""
    if not isinstance(text, str) or len(text) != 43 or not re.fullmatch(r"[A-Za-z0-9_-]{43}", text):
        raise ValueError("a peer key must be 43 base64url characters")
    try:
        raw = base64.urlsafe_b64decode(text + "=")
    except binascii.Error as exc:
        raise ValueError(f"a peer key must be base64url: {exc}") from exc
    if encode_peer_key(raw) != text:
        raise ValueError("a peer key must be canonical base64url")
    return raw


def peer_id_from_key(peer_key_raw: bytes) -> str:
    """`"p" + base32(sha256(key))[:24].lower()`: a peer id nobody can claim without owning the key."""
    if len(peer_key_raw) != 32:
        raise ValueError(f"a peer key has 32 bytes, not {len(peer_key_raw)}")
    digest = base64.b32encode(hashlib.sha256(peer_key_raw).digest()).decode("ascii")
    return "p" + digest[:24].lower()


@dataclass(frozen=True)
class PeerIdentity:
    """This volunteer's key pair and the peer id derived from it."""

    # The private key; never leaves this machine.
    private_key: Ed25519PrivateKey
    # The public key as 32 raw bytes.
    public_key_raw: bytes

    @property
    def peer_key(self) -> str:
        """The public key as sent to the server (base64url)."""
        return encode_peer_key(self.public_key_raw)

    @property
    def peer_id(self) -> str:
        return peer_id_from_key(self.public_key_raw)


def _identity(private_key: Ed25519PrivateKey) -> PeerIdentity:
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PeerIdentity(private_key=private_key, public_key_raw=raw)


def _create_key(path: Path) -> PeerIdentity | None:
    """Write a new key with mode 0600 from the first byte on; None if another process created it first."""
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot create the peer key {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
        file.flush()
        os.fsync(file.fileno())
    logger.info("created a new peer key in %s", path)
    return _identity(private_key)


def _load_key(path: Path) -> PeerIdentity:
    """Read the key, first taking it back from other users if its mode let them read it."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(0o600)
            logger.warning(
                "the peer key %s was readable by other users (mode %o); its mode is now 0600. If other people "
                "use this machine, delete the file to get a new peer id.",
                path,
                mode,
            )
        with path.open("rb") as file:
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise IdentityError(f"cannot read the peer key {path}: {exc.strerror}") from exc
    if len(data) > MAX_KEY_FILE_BYTES:
        raise IdentityError(f"the peer key {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"the peer key {path} is not an unencrypted PEM private key") from exc
    if not isinstance(private_key, Ed25519PrivateKey):
        raise IdentityError(f"the peer key {path} is not an Ed25519 key")
    return _identity(private_key)


def load_or_create_identity(path: Path) -> PeerIdentity:
    """The peer key stored at `path`, created on first use; the peer id stays the same across runs."""
    private_dir(path.parent)
    if not path.exists():
        created = _create_key(path)
        if created is not None:
            return created
    return _load_key(path)


@dataclass(frozen=True)
class PeerCertificate:
    """A verified peer certificate: who (`user_id`) may act as `peer_id` in `run`, until `expires_at`."""

    # The JWT as received, to forward to peers in signed signaling.
    token: str
    # The server's key id that signed it.
    kid: str
    # The server's public URL (the `iss` claim).
    issuer: str
    # The user who owns the peer.
    user_id: int
    # The run slug it is valid for.
    run: str
    # The peer id, derived from `peer_key`.
    peer_id: str
    # The peer's Ed25519 public key, 32 raw bytes.
    peer_key: bytes
    # Unique certificate id.
    jti: str
    # When the server issued it (UTC).
    issued_at: datetime
    # When it stops being valid (UTC, before the 30 s skew allowance).
    expires_at: datetime


def _claim(claims: dict[str, Any], name: str, kind: type) -> Any:
    value = claims.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CertificateError(f"claim {name!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


class CertificateVerifier:
    """Verifies peer certificates against one server's JWKS.

    `server_url` is the server the volunteer joined through: certificates must name it as `iss`. The JWKS is
    fetched on first use and cached for `JWKS_MAX_AGE_S`; a certificate signed by an unknown `kid` triggers a
    refetch, at most one per `MIN_REFETCH_INTERVAL_S` whatever the number of unknown kids. Pass `http` to
    reuse a client (a test transport, or `HivewireAPI.http`); otherwise the verifier owns one. Thread-safe.
    """

    def __init__(
        self,
        server_url: str,
        *,
        http: httpx.Client | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = normalize_server_url(server_url)
        self._jwks_url = f"{self.issuer}/.well-known/jwks.json"
        self._http = http or httpx.Client(timeout=10.0)
        self._owns_http = http is None
        self._monotonic = monotonic
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._fetched_at: float | None = None
        self._fetch_error: str | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def verify(self, token: str, *, run: str) -> PeerCertificate:
        """Every check of docs/protocol.md; raises `CertificateError` naming the first that fails."""
        if not isinstance(token, str) or len(token) > MAX_CERTIFICATE_BYTES:
            raise CertificateError(f"a certificate must be a string of at most {MAX_CERTIFICATE_BYTES} bytes")
        if not token.isascii():
            raise CertificateError("a certificate must be ASCII")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise CertificateError(f"malformed JWT: {exc}") from exc
        if header.get("alg") != "EdDSA":
            raise CertificateError(f"algorithm must be EdDSA, got {header.get('alg')!r}")
        if header.get("typ") != CERTIFICATE_TYPE:
            raise CertificateError(f"type must be {CERTIFICATE_TYPE!r}, got {header.get('typ')!r}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise CertificateError("the header must carry a key id (kid)")
        key = self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["EdDSA"],
                leeway=CLOCK_SKEW_S,
                options={"require": list(REQUIRED_CLAIMS), "verify_aud": False},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise CertificateError(f"missing claim {exc.claim!r}") from exc
        except jwt.ExpiredSignatureError as exc:
            raise CertificateError("expired") from exc
        except jwt.InvalidSignatureError as exc:
            raise CertificateError("bad signature") from exc
        except jwt.ImmatureSignatureError as exc:  # PyJWT checks iat before _check_claims can
            raise CertificateError("issued in the future") from exc
        except jwt.PyJWTError as exc:
            raise CertificateError(str(exc) or type(exc).__name__) from exc
        return self._check_claims(token, kid, claims, run)

    def _check_claims(self, token: str, kid: str, claims: dict[str, Any], run: str) -> PeerCertificate:
        try:
            issuer = normalize_server_url(_claim(claims, "iss", str))
        except ConfigError as exc:
            raise CertificateError("issuer is not a URL") from exc
        if issuer != self.issuer:
            raise CertificateError(f"issued by {issuer}, expected {self.issuer}")
        if _claim(claims, "run", str) != run:
            raise CertificateError(f"issued for run {claims['run']!r}, expected {run!r}")
        sub = _claim(claims, "sub", str)
        if not _USER_ID.fullmatch(sub):
            raise CertificateError("subject must be a positive decimal user id")
        try:
            peer_key = decode_peer_key(_claim(claims, "peer_key", str))
        except ValueError as exc:
            raise CertificateError(f"peer_key: {exc}") from exc
        peer_id = _claim(claims, "peer_id", str)
        if not _PEER_ID.fullmatch(peer_id) or peer_id != peer_id_from_key(peer_key):
            raise CertificateError("peer_id is not derived from peer_key")
        jti = _claim(claims, "jti", str)
        if not _JTI.fullmatch(jti):
            raise CertificateError("jti must be 22 to 128 base64url characters")
        iat, exp = _claim(claims, "iat", int), _claim(claims, "exp", int)
        if iat > time.time() + CLOCK_SKEW_S:
            raise CertificateError("issued in the future")
        if exp <= iat:
            raise CertificateError("expires before it was issued")
        return PeerCertificate(
            token=token,
            kid=kid,
            issuer=issuer,
            user_id=int(sub),
            run=run,
            peer_id=peer_id,
            peer_key=peer_key,
            jti=jti,
            issued_at=datetime.fromtimestamp(iat, UTC),
            expires_at=datetime.fromtimestamp(exp, UTC),
        )

    def _key(self, kid: str) -> Ed25519PublicKey:
        """The signing key `kid` from the cached JWKS, refreshed when stale or when `kid` is new to it."""
        with self._lock:
            now = self._monotonic()
            age = None if self._fetched_at is None else now - self._fetched_at
            unknown = kid not in self._keys
            if age is None or age >= JWKS_MAX_AGE_S or (unknown and age >= MIN_REFETCH_INTERVAL_S):
                # Failed fetches count too, so an unreachable server is not asked again within the interval;
                # the cached keys stay in use, so peers keep verifying each other while the server is down.
                self._fetched_at = now
                try:
                    self._keys = self._fetch_jwks()
                    self._fetch_error = None
                except (ServerUnreachable, InvalidResponse) as exc:
                    self._fetch_error = str(exc)
                    logger.warning("could not refresh the server's signing keys: %s", exc)
            key = self._keys.get(kid)
            error = self._fetch_error
        if key is None and error is not None:
            raise CertificateError(f"signed by key {kid!r}, and the server's keys are unavailable ({error})")
        if key is None:
            raise CertificateError(f"signed by unknown key {kid!r}")
        return key

    def _fetch_jwks(self) -> dict[str, Ed25519PublicKey]:
        body = bytearray()
        try:
            with self._http.stream("GET", self._jwks_url) as response:
                if response.status_code != 200:
                    raise InvalidResponse(f"{self._jwks_url} answered HTTP {response.status_code}")
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise InvalidResponse(f"{self._jwks_url} is larger than {MAX_JWKS_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"cannot fetch the server's keys from {self._jwks_url}: {exc}") from exc
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise InvalidResponse(f"{self._jwks_url} did not answer JSON") from exc
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list) or len(keys) > MAX_JWKS_KEYS:
            raise InvalidResponse(f"{self._jwks_url} must hold a list of at most {MAX_JWKS_KEYS} keys")
        return dict(filter(None, map(_parse_jwk, keys)))


def _parse_jwk(jwk: object) -> tuple[str, Ed25519PublicKey] | None:
    """An Ed25519 signing key from the JWKS; other or malformed entries are skipped, never trusted."""
    if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        return None
    if jwk.get("alg", "EdDSA") != "EdDSA" or jwk.get("use", "sig") != "sig":
        return None
    kid, x = jwk.get("kid"), jwk.get("x")
    if not isinstance(kid, str) or not _KID.fullmatch(kid) or not isinstance(x, str):
        return None
    try:
        return kid, Ed25519PublicKey.from_public_bytes(decode_peer_key(x))
    except ValueError:
        return None
