"""Per-connection bounds on signaling traffic: message size, a token bucket for the rate, and the timeouts.

Sizes are bytes of UTF-8 text measured before parsing; rates are messages per second; times are seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from hivewire_server.core.config import Settings

AUTH_TIMEOUT_SECONDS = 10.0  # without a bearer header, the first message must authenticate within this
MISSED_HEARTBEATS = 3  # a peer silent for this many heartbeat intervals is disconnected
MALFORMED_IN_A_ROW = 3  # this many malformed messages in a row close the connection (4005)
OUTBOX_MESSAGES = 256  # messages queued for a peer that reads slowly; more are dropped, not buffered
CLOSE_TIMEOUT_SECONDS = 5.0  # a close frame that cannot be handed to the server within this is abandoned


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int
    messages_per_second: int
    burst: int
    heartbeat_seconds: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_message_bytes=settings.signal_max_message_bytes,
            messages_per_second=settings.signal_messages_per_second,
            burst=settings.signal_burst,
            heartbeat_seconds=settings.signal_heartbeat_seconds,
        )

    @property
    def silence_seconds(self) -> float:
        """How long a peer may stay silent before it counts as gone (also the Redis presence lifetime)."""
        return float(MISSED_HEARTBEATS * self.heartbeat_seconds)

    def size_of(self, text: str) -> int | None:
        """The message's size in bytes when it is over the limit; None when it fits."""
        if len(text) * 4 <= self.max_message_bytes:  # no UTF-8 character is longer than 4 bytes
            return None
        size = len(text.encode("utf-8", "surrogatepass"))
        return size if size > self.max_message_bytes else None


class TokenBucket:
    """Holds up to `capacity` tokens, refilled at `rate` per second; each message takes one."""

    def __init__(self, *, rate: float, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._capacity = float(capacity)
        self._tokens = float(capacity)
        self._clock = clock
        self._updated = clock()

    def take(self) -> bool:
        """True if a token was available (the message may pass), False if the sender is too fast."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
