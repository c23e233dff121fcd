"""Text from the network shown on a terminal: a hostile server must not be able to send escape sequences."""

from __future__ import annotations


def printable(text: str, limit: int = 300) -> str:
    """`text` with control characters (ANSI escapes, carriage returns) replaced by `?`, cut at `limit`."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return cleaned + ("…" if len(text) > limit else "")
