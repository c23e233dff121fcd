"""Settings of the signaling client: how it retries, how long it waits, how much it holds (seconds, counts)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hivewire.signaling.messages import MAX_INCOMING_BYTES

__all__ = ["Backoff", "SignalingSettings"]


@dataclass(frozen=True)
class Backoff:
    """Delays between reconnection attempts: exponential, capped, partly random."""

    initial_s: float = 0.5  # wait after the first failure
    max_s: float = 30.0  # the longest wait
    multiplier: float = 2.0  # growth per consecutive failure
    jitter: float = 0.5  # share of each wait drawn at random, so peers dropped together come back apart

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s and self.multiplier >= 1 and 0 <= self.jitter <= 1):
            raise ValueError(f"need 0 < initial_s <= max_s, multiplier >= 1, 0 <= jitter <= 1; got {self}")

    def delay_s(self, failures: int, rng: random.Random) -> float:
        """The wait after `failures` consecutive failures (1 for the first)."""
        base = min(self.max_s, self.initial_s * self.multiplier ** max(0, failures - 1))
        return base * (1 - self.jitter * rng.random())


@dataclass(frozen=True)
class SignalingSettings:
    """Timeouts (seconds) and bounds of the signaling client."""

    backoff: Backoff = field(default_factory=Backoff)
    open_timeout_s: float = 10.0  # TCP, TLS and the WebSocket upgrade
    auth_timeout_s: float = 10.0  # from sending the certificate to the welcome
    start_timeout_s: float = 30.0  # start() gives up without a welcome after this
    request_timeout_s: float = 10.0  # send_signal() waits this long for a connection; request_peers() for its answer
    close_timeout_s: float = 5.0  # waiting for the server's close frame
    ping_interval_s: float = 20.0  # WebSocket pings, which detect a connection that died silently
    ping_timeout_s: float = 20.0  # a ping unanswered this long drops the connection
    stable_after_s: float = 10.0  # a connection that lived this long resets the backoff
    heartbeat_share: float = 0.5  # heartbeats every this share of the welcome's heartbeat_seconds
    rate_share: float = 0.9  # share of the server's rate limit we allow ourselves
    incoming_queue: int = 1024  # messages waiting for recv(); more are dropped with a warning
    max_incoming_bytes: int = MAX_INCOMING_BYTES
