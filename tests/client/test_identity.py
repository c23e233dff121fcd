"""The peer key file (created once, mode 0600, repaired if others could read it) and peer id derivation."""

from __future__ import annotations

import base64
import hashlib
import logging
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hivewire.errors import IdentityError
from hivewire.identity import decode_peer_key, encode_peer_key, load_or_create_identity, peer_id_from_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_peer_id_follows_the_protocol() -> None:
    raw = bytes(range(32))
    expected = "p" + base64.b32encode(hashlib.sha256(raw).digest()).decode()[:24].lower()
    peer_id = peer_id_from_key(raw)
    assert peer_id == expected
    assert len(peer_id) == 25
    assert peer_id[0] == "p"


def test_peer_id_matches_the_server() -> None:
    security = pytest.importorskip("hivewire_server.core.security")
    raw = hashlib.sha256(b"some key").digest()
    assert peer_id_from_key(raw) == security.peer_id_from_key(raw)


def test_peer_id_refuses_a_key_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        peer_id_from_key(b"\x00" * 31)


def test_peer_key_round_trips_as_43_base64url_characters() -> None:
    raw = bytes(range(200, 232))
    text = encode_peer_key(raw)
    assert len(text) == 43
    assert "=" not in text
    assert decode_peer_key(text) == raw


@pytest.mark.parametrize("text", ["", "A" * 42, "A" * 44, "+" * 43, "A" * 42 + "B"])
def test_peer_key_refuses_other_spellings(text: str) -> None:
    with pytest.raises(ValueError, match="peer key"):
        decode_peer_key(text)


def test_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "home" / "peer_key.pem"
    first = load_or_create_identity(path)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    second = load_or_create_identity(path)
    assert second.peer_id == first.peer_id == peer_id_from_key(first.public_key_raw)
    assert decode_peer_key(first.peer_key) == first.public_key_raw


def test_a_world_readable_key_is_repaired_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "peer_key.pem"
    created = load_or_create_identity(path)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="hivewire.identity"):
        loaded = load_or_create_identity(path)
    assert mode(path) == 0o600
    assert loaded.peer_id == created.peer_id
    assert "readable by other users" in caplog.text


@pytest.mark.parametrize(
    "content",
    [
        b"not a key",
        b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 5000 + b"\n-----END PRIVATE KEY-----\n",
    ],
)
def test_a_damaged_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "peer_key.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=str(path)):
        load_or_create_identity(path)


def test_a_key_of_another_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "peer_key.pem"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        load_or_create_identity(path)
