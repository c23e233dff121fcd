"""TURN credentials in coturn's `use-auth-secret` scheme: username "expiry:user", password
base64(HMAC-SHA1(secret, username)). coturn checks them without talking to us."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any


def turn_credentials(secret: str, user_id: int, expires_at_unix: int) -> tuple[str, str]:
    username = f"{expires_at_unix}:{user_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers(
    *, stun_urls: list[str], turn_urls: list[str], secret: str, user_id: int, expires_at_unix: int
) -> list[dict[str, Any]]:
    """The ICE server list a peer passes to its RTCConfiguration (explicit: never a default server)."""
    servers: list[dict[str, Any]] = []
    if stun_urls:
        servers.append({"urls": list(stun_urls)})
    if turn_urls:
        username, credential = turn_credentials(secret, user_id, expires_at_unix)
        servers.append({"urls": list(turn_urls), "username": username, "credential": credential})
    return servers
