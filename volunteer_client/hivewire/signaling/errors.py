"""Errors of signaling: the WebSocket to the server and the end-to-end checks on signed offers and answers.

    HivewireError (hivewire.errors)
    └── SignalingError              base of everything below
        ├── SignalingProtocolError  a message breaks docs/protocol.md (too big, not JSON, unknown type, field)
        ├── SignalingUnavailable    no authenticated connection within the time allowed, or the client is closed
        ├── SignalingRejected       the server refused this peer for good (close code 4001, 4004, 4009, ...)
        │   └── SignalingBanned     close code 4003: the organizer banned this account from the run
        └── SignalingAuthError      a signed offer/answer failed one named check (`check`); it is dropped

Each error says what was expected and what came, so a log line names the fault without a debugger.
"""

from __future__ import annotations

from hivewire.errors import HivewireError

__all__ = [
    "SignalingAuthError",
    "SignalingBanned",
    "SignalingError",
    "SignalingProtocolError",
    "SignalingRejected",
    "SignalingUnavailable",
]


class SignalingError(HivewireError):
    """Base of every error signaling raises on purpose."""


class SignalingProtocolError(SignalingError):
    """A signaling message was refused before use; it is dropped and the connection goes on."""

    advice = "Check that the server and this client speak the same protocol version (pip install -U hivewire)."


class SignalingUnavailable(SignalingError):
    """Nothing can be sent or received now: not connected in time, or `close()` was called."""

    advice = "Check the server URL and your network connection; the client keeps retrying while it runs."


class SignalingRejected(SignalingError):
    """The server closed the connection with a code after which reconnecting cannot help.

    `close_code` and `reason` are what the server sent (docs/protocol.md, "Close codes").
    """

    advice = "Run `hivewire join` again to get a fresh certificate; if it fails again, ask the run's organizer."

    def __init__(self, message: str, *, close_code: int | None, reason: str = "", advice: str | None = None) -> None:
        super().__init__(message, advice=advice)
        self.close_code = close_code
        self.reason = reason


class SignalingBanned(SignalingRejected):
    """Close code 4003: the user behind the certificate is banned from the run."""

    advice = "The organizer banned this account from the run; contact them if you think this is a mistake."


class SignalingAuthError(SignalingError):
    """A signed offer or answer was refused; `check` names the check that failed (docs/protocol.md).

    Checks: "kind", "payload", "timestamp", "fingerprints", "certificate", "sender", "signature", "replay".
    """

    advice = "The peer or a relay sent a description that fails authentication; the link is not opened."

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check
