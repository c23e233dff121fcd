"""Errors of progress gossip and matchmaking.

    CoordinationError
    ├── RecordRefused     a progress or matchmaking record from a peer was refused; ``check`` names the check
    └── RoundAbandoned    the members of a group did not all confirm the same membership in time

A refused record changes nothing (it is dropped, counted and logged); an abandoned round names the members
that stayed silent or proposed another membership, so the next attempt can go on without them.
"""


class CoordinationError(Exception):
    """Base of every error coordination raises on purpose."""


class RecordRefused(CoordinationError):
    """A record from a peer failed ``check`` (schema, time, certificate, signature, ...); it was dropped."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check


class RoundAbandoned(CoordinationError):
    """No agreement on ``round_id``: ``silent`` members confirmed nothing, ``disagreeing`` proposed another group."""

    def __init__(self, round_id: str, *, silent: frozenset[str], disagreeing: frozenset[str]) -> None:
        super().__init__(
            f"round {round_id} abandoned: silent {sorted(silent) or 'none'}, "
            f"proposed another group {sorted(disagreeing) or 'none'}"
        )
        self.round_id = round_id
        self.silent = silent
        self.disagreeing = disagreeing
