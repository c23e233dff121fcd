"""Errors of averaging.

    AveragingError
    ├── PartRejected      a received part or message was refused (bad header, size, dtype, NaN/Inf, ...)
    └── PeerUnreachable   the transport cannot reach a group member any more (closed, lost, unknown)

A member that causes either is excluded from the round; the round itself goes on. Each error says what was
expected and what came, so the log line that excludes a peer names the fault.
"""


class AveragingError(Exception):
    """Base of every error averaging raises on purpose."""


class PartRejected(AveragingError):
    """A part or averaging message from a peer was refused; nothing of it was used."""


class PeerUnreachable(AveragingError):
    """A group member cannot be sent to or received from any more (its link closed or was never there)."""
