"""Progress gossip: every peer's signed {epoch, samples, throughput}, and the run's progress estimated from them.

Throughput is twofold: ``samples_per_second`` (training speed, for the ETA) and ``link_throughput`` (the best
recent payload rate among the author's links in bytes/s, measured when it announces; 0 when unknown).

Each peer announces its own signed record to its neighbours with ``ttl = gossip_hops - 1``; a peer that
accepts it passes it on with ``ttl - 1`` while the ttl is above 0, so it reaches peers up to ``gossip_hops``
links away. A record no newer than the one held for its author (same or older ``time``) is a duplicate
and goes no further. Records are checked (records.py) before they count, and a peer unheard for
``record_expiration_s`` drops out of the view. A peer that leaves says so (``farewell()``): its signed
farewell travels the same way and drops it from every view at once; its older records, still in flight,
no longer count.

The view (``GlobalProgress``) follows hivemind's ProgressTracker: the run's epoch, the samples accumulated
towards ``target_batch_size`` in it, extrapolated by each peer's throughput since its record, and the time
until the target is reached. Our own record is re-announced more often as that time shrinks, between
``min_announce_interval_s`` and ``max_announce_interval_s``.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from hivewire.coordination.errors import RecordRefused
from hivewire.coordination.records import (
    MAX_GOSSIP_TTL,
    MAX_LINK_THROUGHPUT,
    PROGRESS_TYPES,
    Progress,
    ProgressVerifier,
    sign_farewell,
    sign_progress,
)
from hivewire.coordination.transport import GossipTransport, measured_throughput
from hivewire.identity import CertificateVerifier, PeerIdentity
from hivewire.mesh import MeshError

logger = logging.getLogger(__name__)

_LOGGED_REFUSALS = 10  # refusals logged one by one before the log thins out to every 1000th


@dataclass(frozen=True)
class ProgressSettings:
    """How progress is gossiped and estimated; every peer of a run should use the same values."""

    target_batch_size: int  # samples the whole run accumulates per epoch (one averaging round)
    record_expiration_s: float = 60.0  # a peer unheard for this long leaves the view (hivemind: 60 s)
    max_clock_skew_s: float = 10.0  # records dated further ahead of our clock are refused
    min_announce_interval_s: float = 0.5  # our record is re-announced at most this often (hivemind: 0.5 s)
    max_announce_interval_s: float = 10.0  # ... and at least this often (hivemind: 10 s)
    expected_drift_peers: int = 3  # peers that may join before the next announcement (hivemind: 3)
    expected_drift_rate: float = 0.2  # ... or this fraction of the run, whichever is more (hivemind: 0.2)
    gossip_hops: int = 3  # links our record travels at most (neighbours re-gossip it with ttl - 1)
    max_peers: int = 4096  # peers tracked; records of more are refused until some expire
    inbox_records: int = 1024  # received records waiting for their checks; more are dropped

    def __post_init__(self) -> None:
        if self.target_batch_size < 1:
            raise ValueError(f"target_batch_size must be >= 1, got {self.target_batch_size}")
        if not 0 < self.min_announce_interval_s <= self.max_announce_interval_s < self.record_expiration_s:
            raise ValueError(
                "need 0 < min_announce_interval_s <= max_announce_interval_s < record_expiration_s, "
                f"got {self.min_announce_interval_s}, {self.max_announce_interval_s}, {self.record_expiration_s}"
            )
        if not 1 <= self.gossip_hops <= MAX_GOSSIP_TTL + 1:
            raise ValueError(f"gossip_hops must lie in 1..{MAX_GOSSIP_TTL + 1}, got {self.gossip_hops}")


@dataclass(frozen=True)
class GlobalProgress:
    """The run as one peer sees it at ``time``."""

    epoch: int  # the epoch most live peers are at; a tie goes to the higher epoch
    local_epoch: int  # our own epoch; below ``epoch`` means we missed a round and must catch up
    peers: tuple[str, ...]  # live peers at ``epoch`` (ourselves included when we are at it), sorted
    num_peers: int  # live peers at any epoch, ourselves included
    samples_accumulated: int  # as reported by the peers at ``epoch``
    estimated_samples: float  # ... plus what each did since its record, at its reported rate
    samples_per_second: float  # the summed throughput of the peers at ``epoch``
    target_batch_size: int
    eta_s: float  # until estimated_samples reaches the target: 0 once reached, inf without throughput
    param_hashes: Mapping[str, str | None]  # of the peers at ``epoch``, for divergence checks
    time: float
    link_throughputs: Mapping[str, float] = field(default_factory=dict)  # bytes/s of the peers at ``epoch``;
    # 0 when unknown. For operators: a round's parts follow the values in the group's proposals (matchmaking).

    @property
    def ready(self) -> bool:
        """The run has (by estimate) accumulated the target batch: time for the epoch's averaging round."""
        return self.estimated_samples >= self.target_batch_size

    @property
    def behind(self) -> bool:
        return self.local_epoch < self.epoch


def estimate_global_progress(
    records: Iterable[Progress], *, local: Progress, target_batch_size: int, now: float
) -> GlobalProgress:
    """The view from live ``records`` and our own ``local`` progress (which replaces any record of ours).

    The epoch is the one most peers are at, not the highest claimed (hivemind takes the highest): one peer
    claiming a far epoch, by bug or malice, must not make everyone else believe it is behind.
    """
    live = {record.peer_id: record for record in records}
    live[local.peer_id] = local
    counts = Counter(record.epoch for record in live.values())
    epoch = max(counts, key=lambda candidate: (counts[candidate], candidate))
    at_epoch = sorted((record for record in live.values() if record.epoch == epoch), key=lambda r: r.peer_id)
    reported = sum(record.samples_accumulated for record in at_epoch)
    estimated = sum(
        record.samples_accumulated + max(0.0, now - record.time) * record.samples_per_second for record in at_epoch
    )
    rate = sum(record.samples_per_second for record in at_epoch)
    remaining = max(0.0, target_batch_size - estimated)
    eta_s = 0.0 if remaining == 0 else (remaining / rate if rate > 0 else math.inf)
    return GlobalProgress(
        epoch=epoch,
        local_epoch=local.epoch,
        peers=tuple(record.peer_id for record in at_epoch),
        num_peers=len(live),
        samples_accumulated=reported,
        estimated_samples=estimated,
        samples_per_second=rate,
        target_batch_size=target_batch_size,
        eta_s=eta_s,
        param_hashes={record.peer_id: record.param_hash for record in at_epoch},
        time=now,
        link_throughputs={record.peer_id: record.link_throughput for record in at_epoch},
    )


def announce_interval_s(view: GlobalProgress, settings: ProgressSettings) -> float:
    """hivemind's refresh period: a share of the ETA that shrinks as more peers may join, clipped.

    Far from the target a record every ``max_announce_interval_s`` is enough; close to it the view must be
    fresh, so that every peer sees the boundary at about the same moment.
    """
    n = view.num_peers
    expected_peers = max(n + settings.expected_drift_peers, n * (1 + settings.expected_drift_rate))
    interval = view.eta_s * n / expected_peers
    return min(max(interval, settings.min_announce_interval_s), settings.max_announce_interval_s)


@dataclass
class ProgressStats:
    """Counters an operator reads to see what gossip carried and refused."""

    announced: int = 0  # our own records sent (one per announcement, not per neighbour)
    accepted: int = 0  # records of others that passed every check and updated the view
    duplicates: int = 0  # records no newer than the one held for their author (dropped, not forwarded)
    forwarded: int = 0  # records re-gossiped, counted per neighbour
    expired: int = 0  # peers dropped from the view after record_expiration_s of silence
    farewells: int = 0  # peers dropped from the view because they said they left
    dropped: int = 0  # records dropped unchecked because the inbox was full
    refused: Counter[str] = field(default_factory=Counter)  # by check: schema, time, stale, certificate, ...


class ProgressTracker:
    """Announces our progress, checks and re-gossips everyone else's, and keeps the view.

    ``certificate`` returns our current certificate (renewed ones are picked up on the next announcement).
    The trainer calls ``report()`` as it goes; ``view()`` or ``wait_ready()`` say when the epoch's round is due.
    """

    def __init__(
        self,
        identity: PeerIdentity,
        certificate: Callable[[], str],
        certificates: CertificateVerifier,
        transport: GossipTransport,
        *,
        run: str,
        settings: ProgressSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.peer_id = identity.peer_id
        self.settings = settings
        self.stats = ProgressStats()
        self._identity = identity
        self._certificate = certificate
        self._transport = transport
        self._run = run
        self._clock = clock
        self._verifier = ProgressVerifier(
            certificates,
            run=run,
            max_age_s=settings.record_expiration_s,
            max_future_s=settings.max_clock_skew_s,
            max_peers=settings.max_peers,
            clock=clock,
        )
        self._local = Progress(self.peer_id, 0, 0, 0.0, clock())
        self._records: dict[str, Progress] = {}
        self._departed: dict[str, float] = {}  # peer -> the time of its farewell; its records up to then are void
        self._announced_at = -math.inf  # the time of our last announced record
        self._inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=settings.inbox_records)
        self._announce_now = asyncio.Event()
        self._changed = asyncio.Event()  # replaced by a fresh one on every change; waiters hold the old one
        self._tasks: set[asyncio.Task[None]] = set()
        transport.on_records((*PROGRESS_TYPES, "farewell"), self._on_record)

    async def start(self) -> None:
        """Start announcing our record and checking received ones."""
        loop = asyncio.get_running_loop()
        for work, name in ((self._consume(), "consume"), (self._announce(), "announce")):
            task = loop.create_task(work, name=f"hivewire-progress-{name}")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    async def close(self) -> None:
        """Stop both tasks; the view stays readable."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def farewell(self) -> int:
        """Tell the neighbours (and, by gossip, their neighbours) that we left; call after close(), so no
        announcement follows it. The neighbours it went to, counted (best effort: records expire anyway)."""
        at = max(self._clock(), math.nextafter(self._announced_at, math.inf))  # newer than our last record
        record = sign_farewell(
            self._identity, self._certificate(), run=self._run, time=at, ttl=self.settings.gossip_hops - 1
        )
        return sum(self._send(peer, record) for peer in self._transport.neighbours)

    @property
    def local(self) -> Progress:
        return self._local

    def report(
        self, *, epoch: int, samples_accumulated: int, samples_per_second: float, param_hash: str | None = None
    ) -> None:
        """Our own progress as of now; a new epoch is announced at once, other changes on the next interval."""
        new_epoch = epoch != self._local.epoch
        self._local = Progress(
            self.peer_id,
            epoch,
            samples_accumulated,
            float(samples_per_second),
            self._clock(),
            param_hash,
            self._local.link_throughput,  # measured by the announcer, which owns it
        )
        if new_epoch:
            self._announce_now.set()
        self._notify()

    def records(self) -> dict[str, Progress]:
        """Live records of other peers by peer id (expired ones are dropped first)."""
        cutoff = self._clock() - self.settings.record_expiration_s
        for peer in [peer for peer, record in self._records.items() if record.time < cutoff]:
            del self._records[peer]
            self.stats.expired += 1
            logger.info("%s dropped out of the progress view: silent for %s s", peer, self.settings.record_expiration_s)
        for peer in [peer for peer, at in self._departed.items() if at < cutoff]:
            del self._departed[peer]  # records from before its farewell are refused as stale by now
        return dict(self._records)

    def view(self) -> GlobalProgress:
        return estimate_global_progress(
            self.records().values(),
            local=self._local,
            target_batch_size=self.settings.target_batch_size,
            now=self._clock(),
        )

    async def wait_ready(self) -> GlobalProgress:
        """Wait until the view says the target batch is reached (by records, or by extrapolation in time)."""
        while True:
            changed = self._changed
            view = self.view()
            if view.ready:
                return view
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(view.eta_s, announce_interval_s(view, self.settings)))

    async def wait_for_round_peers(self, epoch: int, timeout_s: float) -> GlobalProgress:
        """The view to matchmake ``epoch`` from, once no live peer's record is one epoch behind, or after
        ``timeout_s``. Such a peer has almost always just finished the previous round with us and announces
        ``epoch`` a moment later; matchmaking before that leaves it, and perhaps us, alone in the round (with
        two peers the view's tie goes to the higher epoch, whose peers are only us)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            changed = self._changed
            lagging = any(record.epoch == epoch - 1 for record in self.records().values())
            remaining = deadline - loop.time()
            if not lagging or remaining <= 0:
                return self.view()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_record(self, sender: str, record: dict[str, Any]) -> None:
        try:
            self._inbox.put_nowait((sender, record))
        except asyncio.QueueFull:
            self.stats.dropped += 1
            self._log_refusal(self.stats.dropped, sender, "inbox full, record dropped unchecked")

    async def _consume(self) -> None:
        while True:
            sender, record = await self._inbox.get()
            try:
                await self._accept(sender, record)
            except RecordRefused as exc:
                self.stats.refused[exc.check] += 1
                self._log_refusal(sum(self.stats.refused.values()), sender, exc)

    async def _accept(self, sender: str, record: dict[str, Any]) -> None:
        """Check a record and, when it is news, take it into the view and pass it on."""
        if record.get("type") == "farewell":
            await self._accept_farewell(sender, record)
            return
        claimed = self._verifier.check_schema(record)
        known = self._records.get(claimed.peer_id)
        if (
            claimed.peer_id == self.peer_id
            or (known is not None and claimed.time <= known.time)
            or claimed.time <= self._departed.get(claimed.peer_id, -math.inf)  # sent before it left
        ):
            self.stats.duplicates += 1
            return
        if known is None and len(self.records()) >= self.settings.max_peers:
            raise RecordRefused("capacity", f"already tracking max_peers={self.settings.max_peers} peers")
        progress = await self._verifier.verify(record)
        self._records[progress.peer_id] = progress
        self.stats.accepted += 1
        self._notify()
        self._forward(sender, progress.peer_id, record)

    async def _accept_farewell(self, sender: str, record: dict[str, Any]) -> None:
        """A peer left: once its farewell checks out, drop it from the view now rather than when it expires."""
        claimed = self._verifier.check_farewell_schema(record)
        known = self._records.get(claimed.peer_id)
        if (
            claimed.peer_id == self.peer_id
            or claimed.time <= self._departed.get(claimed.peer_id, -math.inf)
            or (known is not None and claimed.time < known.time)  # it came back since
        ):
            self.stats.duplicates += 1
            return
        if claimed.peer_id not in self._departed and len(self._departed) >= self.settings.max_peers:
            raise RecordRefused("capacity", f"already holding max_peers={self.settings.max_peers} farewells")
        farewell = await self._verifier.verify_farewell(record)
        self._records.pop(farewell.peer_id, None)
        self._departed[farewell.peer_id] = farewell.time
        self.stats.farewells += 1
        logger.info("%s left the run: dropped from the progress view", farewell.peer_id)
        self._notify()
        self._forward(sender, farewell.peer_id, record)

    def _forward(self, sender: str, author: str, record: dict[str, Any]) -> None:
        """Pass an accepted record on with one hop less, to neighbours other than its sender and author."""
        if record["ttl"] > 0:
            forwarded = {**record, "ttl": record["ttl"] - 1}
            for peer in self._transport.neighbours:
                if peer not in (sender, author) and self._send(peer, forwarded):
                    self.stats.forwarded += 1

    async def _announce(self) -> None:
        while True:
            self._announce_now.clear()
            # Receivers drop a record no newer than the last: on a coarse clock (Windows: ~16 ms) two
            # announcements could share a time, so the time moves on by at least one ulp.
            self._announced_at = max(self._clock(), math.nextafter(self._announced_at, math.inf))
            throughput = min(measured_throughput(self._transport), MAX_LINK_THROUGHPUT)
            self._local = replace(self._local, link_throughput=throughput)
            local = replace(self._local, time=self._announced_at)
            record = sign_progress(
                self._identity, self._certificate(), local, run=self._run, ttl=self.settings.gossip_hops - 1
            )
            for peer in self._transport.neighbours:
                self._send(peer, record)
            self.stats.announced += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._announce_now.wait(), announce_interval_s(self.view(), self.settings))

    def _send(self, peer: str, record: Mapping[str, Any]) -> bool:
        try:
            self._transport.send_control(peer, record)
        except MeshError as exc:
            logger.debug("progress record not sent to %s: %s", peer, exc)
            return False
        return True

    def _task_done(self, task: "asyncio.Task[None]") -> None:
        """Forget a finished task; one that ended other than by close() is a bug, and gossip stopped."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("progress task %s failed; progress gossip stopped", task.get_name(), exc_info=task.exception())

    def _log_refusal(self, count: int, sender: str, reason: object) -> None:
        if count <= _LOGGED_REFUSALS or count % 1000 == 0:
            logger.warning("refused a progress record from %s (%d so far): %s", sender, count, reason)
