"""Passwords (argon2id), random secrets and their hashes, base64url helpers."""

from __future__ import annotations

import base64
import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()
# A real hash to verify against when the email is unknown, so timing does not reveal which emails exist.
_DUMMY_HASH = _hasher.hash("not-a-password-anyone-has")

API_TOKEN_PREFIX = "hw_"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password: str, password_hash: str | None) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def new_api_token() -> str:
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def sha256_hex(value: str) -> str:
    """Stored form of bearer secrets (API tokens, device codes): high-entropy, so a fast hash suffices."""
    return hashlib.sha256(value.encode()).hexdigest()


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding; raises ValueError on anything else."""
    if not text or len(text) % 4 == 1 or "=" in text:
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def peer_id_from_key(peer_key_raw: bytes) -> str:
    """docs/protocol.md: "p" + the first 24 base32 characters of SHA-256(peer key), lower case."""
    digest = hashlib.sha256(peer_key_raw).digest()
    return "p" + base64.b32encode(digest).decode()[:24].lower()
