"""Which peers to link to next: known candidates, retry backoff, what each neighbour says it links to, glare.

Pure bookkeeping with an injected clock, so the rules are tested without a network. The manager asks
:meth:`NeighbourTable.next_candidates` whenever it has room and reports every outcome back.
"""

import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

PEER_ID = re.compile(r"p[a-z2-7]{24}")


def is_peer_id(value: object) -> bool:
    """True for a well-formed peer id (docs/protocol.md, "Identities")."""
    return isinstance(value, str) and PEER_ID.fullmatch(value) is not None


def our_offer_wins(self_id: str, remote_id: str) -> bool:
    """Glare rule: when two peers offer to each other at once, the lower peer id's offer is kept.

    Both sides evaluate the same total order, so exactly one offer survives without another round trip.
    """
    return self_id < remote_id


@dataclass(frozen=True)
class Backoff:
    """Delay before retrying a peer after a failure: base * 2**(failures-1), capped, with jitter."""

    base_s: float = 1.0  # first retry delay
    max_s: float = 60.0  # cap, so a peer that comes back is retried within a minute
    jitter: float = 0.2  # +/- fraction, so peers that failed together do not retry together

    def delay_s(self, failures: int, rng: random.Random) -> float:
        raw = min(self.max_s, self.base_s * 2 ** max(0, failures - 1))
        return raw * (1 + rng.uniform(-self.jitter, self.jitter))


@dataclass
class _Candidate:
    failures: int = 0
    retry_at: float = 0.0


class NeighbourTable:
    """Known peers of the run, their retry state, and the neighbour lists our neighbours gossip."""

    def __init__(
        self,
        self_id: str,
        *,
        backoff: Backoff | None = None,
        max_candidates: int = 1024,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.self_id = self_id
        self.backoff = backoff or Backoff()
        self.max_candidates = max_candidates
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311  (jitter and spreading, not secrets)
        self._candidates: dict[str, _Candidate] = {}
        self._their_neighbours: dict[str, frozenset[str]] = {}

    def add(self, peers: Iterable[str]) -> int:
        """Learn peers (from the join response, presence, gossip); returns how many were new."""
        added = 0
        for peer in peers:
            if peer == self.self_id or peer in self._candidates or not is_peer_id(peer):
                continue
            if len(self._candidates) >= self.max_candidates:
                break
            self._candidates[peer] = _Candidate()
            added += 1
        return added

    def remove(self, peer: str) -> None:
        """Forget a peer the server says has left."""
        self._candidates.pop(peer, None)
        self._their_neighbours.pop(peer, None)

    def known(self) -> set[str]:
        return set(self._candidates)

    def failed(self, peer: str) -> float:
        """Record a failed or lost link; returns the delay in seconds before the peer is tried again.

        A peer removed meanwhile (the server said it left) stays removed; 0.0 then.
        """
        candidate = self._candidates.get(peer)
        if candidate is None:
            return 0.0
        candidate.failures += 1
        delay = self.backoff.delay_s(candidate.failures, self._rng)
        candidate.retry_at = self._clock() + delay
        return delay

    def succeeded(self, peer: str) -> None:
        """A link opened: the next failure starts the backoff from the beginning."""
        candidate = self._candidates.setdefault(peer, _Candidate())
        candidate.failures = 0
        candidate.retry_at = 0.0

    def next_candidates(self, busy: set[str], room: int) -> list[str]:
        """Up to ``room`` peers to try now: not busy (linked or being linked), not backing off.

        Never-failed peers first, then in random order, so peers spread their links instead of all
        crowding the first peer of the join response.
        """
        if room <= 0:
            return []
        now = self._clock()
        ready = [p for p, c in self._candidates.items() if p not in busy and c.retry_at <= now]
        self._rng.shuffle(ready)
        ready.sort(key=lambda peer: self._candidates[peer].failures)
        return ready[:room]

    def next_retry_in_s(self, busy: set[str]) -> float | None:
        """Seconds until the earliest backing-off candidate may be tried; None when none is waiting."""
        now = self._clock()
        waits = [c.retry_at - now for p, c in self._candidates.items() if p not in busy and c.retry_at > now]
        return max(0.0, min(waits)) if waits else None

    def set_their_neighbours(self, neighbour: str, peers: Iterable[str]) -> None:
        """Store the neighbour list ``neighbour`` gossiped; its peers become candidates too."""
        valid = frozenset(p for p in peers if is_peer_id(p) and p != neighbour)
        self._their_neighbours[neighbour] = valid
        self.add(valid)

    def forget_neighbour(self, neighbour: str) -> None:
        """Our link to ``neighbour`` is gone; its list can no longer route relays."""
        self._their_neighbours.pop(neighbour, None)

    def relays_for(self, target: str, linked: Iterable[str]) -> list[str]:
        """Linked neighbours that say they link to ``target``: who can forward signaling to it."""
        return sorted(n for n in linked if target in self._their_neighbours.get(n, frozenset()) and n != target)
