"""The network process: signaling, mesh, progress gossip, matchmaking, butterfly averaging, state download.

Why a process apart from training (DESIGN.md, "Training and networking live in separate processes"): aiortc's
SCTP is pure Python and holds ~100% of a core while it moves data (shared/notes/webrtc-field-notes.md).
On the trainer's interpreter it would stall every training step, and training would starve the transfers
(5-8 MB/s under contention). So the CLI's main process trains and this one talks. They share the flat
gradient (or pseudo-gradient) buffer through shared memory (`share_memory_()`, passed at spawn) and
exchange small records over a Pipe (messages.py): "progress", "average the buffer for epoch e with weight
w" -> "done, members, excluded".

Ctrl-C reaches the whole process group; this process ignores SIGINT and leaves when the trainer says
`Leave` (or its Pipe closes), so a round in flight is abandoned in one place, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import signal
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any

import torch

from hivewire.averaging import LinkGroupTransport, butterfly_allreduce, get_codec
from hivewire.averaging.partition import MAX_GROUP_SIZE
from hivewire.coordination import (
    COORDINATION_SCHEMAS,
    Group,
    Matchmaker,
    MatchmakingSettings,
    ProgressSettings,
    ProgressTracker,
    RoundAbandoned,
)
from hivewire.doctor import PROBE_SCHEMAS, ProbeResponder
from hivewire.errors import HivewireError
from hivewire.identity import CertificateVerifier, load_or_create_identity
from hivewire.mesh import DirectSettings, Link, Mesh, MeshError, MeshSettings, restrict_host_addresses, tuning
from hivewire.session.messages import (
    Average,
    Averaged,
    Failed,
    Leave,
    Left,
    NetworkConfig,
    Receipt,
    Renewed,
    Report,
    Snapshot,
    Started,
    StateBlob,
    View,
)
from hivewire.session.receipts import RECEIPT_SCHEMAS, RECEIPT_TIMEOUT_S, ReceiptExchange
from hivewire.session.state import STATE_SCHEMAS, StateExchange
from hivewire.signaling import DescriptionVerifier, SignalingClient

logger = logging.getLogger(__name__)

CATCH_UP_INTERVAL_S = 0.25  # how often we check whether the run moved past our epoch (a joiner races its round)
MAX_DONORS = 4  # neighbours a late joiner downloads the state from at once
LOADED_TIMEOUT_S = 10.0  # after handing the trainer a state, wait this long for it to report that epoch
LINGER_S = 5.0  # at most this long for the neighbours to take what we sent them before the links close
# Before matchmaking, wait at most this long for peers whose record is one epoch behind (they just finished
# the previous round with us and are about to say so).
ROUND_PEERS_WAIT_S = 3.0
PROBE_INTERVAL_S = 10.0  # `hivewire doctor` throughput probes taken at most this often (each <= 8 MiB, 9 s)
_POLL_S = 0.1  # for conditions that other tasks change (gossip, the trainer's reports)


def run_network(config: NetworkConfig, conn: Connection, buffer: torch.Tensor) -> None:
    """Entry point of the spawned process; ``buffer`` is the shared flat tensor the rounds average in place."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer handles Ctrl-C and sends Leave
    logging.basicConfig(level=config.log_level, format="%(levelname)s: network: %(message)s")
    torch.set_num_threads(1)  # the trainer's cores are for training
    # Before any peer connection exists: the SCTP class is chosen when a link's first channel is created.
    tuning.apply_sctp_tuning(config.sctp_tuning)
    tuning.run(NetworkSide(config, conn, buffer).run())  # on uvloop where installed (the largest single gain)


async def _poll_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Whether ``predicate`` became true within ``timeout_s``, checked every _POLL_S."""
    polls = itertools.count() if math.isinf(timeout_s) else range(math.ceil(timeout_s / _POLL_S))
    for _ in polls:
        if predicate():
            return True
        await asyncio.sleep(_POLL_S)
    return predicate()


def _holders(hashes: dict[str, str], digest: str) -> tuple[str, ...]:
    return tuple(sorted(peer for peer, held in hashes.items() if held == digest))


def _rank(peer: str) -> int:
    """Order of peer ids as a number, so that max() can prefer the lowest."""
    return int.from_bytes(peer.encode(), "big")


def link_kind(link: Link) -> str:
    """direct (mutual-TLS TCP bulk path), else host, reflexive or relay: the candidate types of the pair ICE
    nominated (aioice internals, best effort)."""
    if getattr(link, "path", None) == "direct-tls":
        return "direct"
    try:
        sctp: Any = link._pc.sctp  # None until negotiated: the AttributeError below covers it
        connection = sctp.transport.transport._connection  # RTCIceTransport's aioice Connection
        pair = next(iter(connection._nominated.values()))
        types = {pair.local_candidate.type, pair.remote_candidate.type}
    except (AttributeError, StopIteration):
        return "unknown"
    if "relay" in types:
        return "relay"
    return "reflexive" if types & {"srflx", "prflx"} else "host"


class NetworkSide:
    """One volunteer's networking, driven by the trainer's messages."""

    def __init__(self, config: NetworkConfig, conn: Connection, buffer: torch.Tensor) -> None:
        self.config = config
        self._conn = conn
        self._buffer = buffer
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._send_lock = asyncio.Lock()
        self._bulk = asyncio.Lock()  # one reader of the bulk channels at a time: a round or a download
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_epoch = 0  # the epoch the trainer is about to report, once a round finished
        self._certificate = config.certificate  # replaced when the trainer renews it
        self._receipt_tasks: set[asyncio.Task[None]] = set()  # co-signing; awaited (bounded) before leaving

    async def run(self) -> None:
        config = self.config
        if config.host_addresses is not None:
            restrict_host_addresses(list(config.host_addresses))
        identity = load_or_create_identity(config.key_path)
        self.me = identity.peer_id
        certificates = CertificateVerifier(config.server)

        def certificate() -> str:
            return self._certificate

        self.mesh = Mesh(
            identity,
            certificate,
            DescriptionVerifier(certificates, run=config.run, self_peer_id=identity.peer_id),
            ice_servers=config.ice_servers,
            signaling=SignalingClient(config.signaling_url, certificate),
            settings=MeshSettings(direct=DirectSettings(enabled=config.direct_path)),
            schemas=(*COORDINATION_SCHEMAS, *STATE_SCHEMAS, *RECEIPT_SCHEMAS, *PROBE_SCHEMAS),
        )
        self.tracker = ProgressTracker(
            identity,
            certificate,
            certificates,
            self.mesh,
            run=config.run,
            settings=ProgressSettings(target_batch_size=config.target_batch_size),
        )
        self.matchmaker = Matchmaker(self.mesh, MatchmakingSettings(group_size=min(config.group_size, MAX_GROUP_SIZE)))
        self.states = StateExchange(self.mesh)
        self.receipts = ReceiptExchange(self.mesh, identity, certificate, certificates, run=config.run)
        self.probes = ProbeResponder(self.mesh, accept=self._takes_probe)
        self._probed_at = -math.inf
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read_pipe, args=(loop,), name="hivewire-pipe-reader", daemon=True).start()
        try:
            await self.mesh.start(config.initial_peers)
            await self.tracker.start()
            await self._send(Started(await self._initial_state()))
            self._spawn(self._send_views(), "views")
            self._spawn(self._catch_up(), "catch-up")
            await self._serve_trainer()
        except HivewireError as exc:
            logger.debug("network side failed", exc_info=True)
            await self._send(Failed(str(exc), exc.advice))
        except Exception as exc:  # report any failure to the trainer rather than leave it waiting
            logger.exception("network side failed")
            await self._send(Failed(f"{type(exc).__name__}: {exc}", "This is a bug; please report it with the log."))
        finally:
            if self._receipt_tasks:  # the last rounds' receipts: their members are leaving too, so it is short
                await asyncio.wait(self._receipt_tasks, timeout=RECEIPT_TIMEOUT_S)
            for task in [*self._tasks, *self._receipt_tasks]:
                task.cancel()
            await asyncio.gather(*self._tasks, *self._receipt_tasks, return_exceptions=True)
            await self.tracker.close()
            # Before the linger, which gives the record time to leave: peers drop us from their view now, not
            # after record_expiration_s, and do not wait for us, or download from us, at an epoch we reached.
            told = self.tracker.farewell()
            logger.info("said farewell to %d neighbour(s)", told)
            await self._linger()
            await self.probes.close()
            await self.states.close()
            await self.mesh.close()
            certificates.close()
            with contextlib.suppress(OSError):
                await self._send(Left())

    async def _linger(self) -> None:
        """Let what we queued on the bulk channels (a last round's results) leave before the links close.

        Peers that reach --max-epochs together leave right after the last round; closing at once could cut
        a result another member still waits for, and that member would keep its own values (and diverge).
        """
        links = [link for peer in self.mesh.neighbours if (link := self.mesh.link(peer)) is not None]
        # Link.flush returns once the peer released (consumed or refused) every payload: delivered, not merely
        # handed to SCTP or TCP. All links at once, so the wait is LINGER_S at most in all.
        flushed = await asyncio.gather(*(link.flush(LINGER_S) for link in links))
        if not all(flushed):
            stuck = [link.peer for link, done in zip(links, flushed, strict=True) if not done]
            logger.info("left with payloads that %s had not taken within %s s", stuck, LINGER_S)

    def _takes_probe(self, peer: str) -> bool:
        """Whether to answer a `hivewire doctor` throughput probe from ``peer``.

        Only from a peer outside the run's progress view (a doctor trains nothing): a round or a state
        download reads the bulk payloads of the run's peers, and a probe's drain would take them. A certified
        peer could probe, then join the view and a group: its drain would then eat that round's payloads from
        it alone, which the butterfly excludes. At most one probe per PROBE_INTERVAL_S, so probes cannot
        keep this volunteer's network side busy.
        """
        now = asyncio.get_running_loop().time()
        if peer in self.tracker.records() or now - self._probed_at < PROBE_INTERVAL_S:
            return False
        self._probed_at = now
        return True

    # ------------------------------------------------------------------------------ the trainer's side

    def _read_pipe(self, loop: asyncio.AbstractEventLoop) -> None:
        """Blocking reads of the trainer's Pipe in a thread of their own, handed to the loop.

        Not ``loop.add_reader``: under uvloop that puts the Pipe's socket in non-blocking mode (libuv's poll
        handle), and ``Connection.recv`` then fails halfway through a message that arrives in parts.
        """
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):  # the trainer is gone: leave
                message = Leave()
            try:
                loop.call_soon_threadsafe(self._inbox.put_nowait, message)
            except RuntimeError:  # the loop already closed: the process is exiting
                return
            if isinstance(message, Leave):
                return

    async def _send(self, message: object) -> None:
        """Off the event loop: a snapshot may fill the Pipe until the trainer reads it."""
        async with self._send_lock:
            await asyncio.to_thread(self._conn.send, message)

    async def _serve_trainer(self) -> None:
        while True:
            message = await self._inbox.get()
            if isinstance(message, Report):
                self.tracker.report(
                    epoch=message.epoch,
                    samples_accumulated=message.samples_accumulated,
                    samples_per_second=message.samples_per_second,
                    param_hash=message.param_hash,
                )
            elif isinstance(message, Snapshot):
                self.states.offer(message.epoch, message.blob)
            elif isinstance(message, Renewed):
                self._certificate = message.certificate  # signaling, offers, gossip and receipts read it anew
                logger.info("using the renewed certificate from now on")
            elif isinstance(message, Average):
                self._spawn(self._average(message), f"round-{message.epoch}")
            elif isinstance(message, Leave):
                logger.info("leaving the run: abandoning any round in flight and closing the mesh")
                return

    async def _send_views(self) -> None:
        while True:
            view = self.tracker.view()
            links = [link for peer in self.mesh.neighbours if (link := self.mesh.link(peer)) is not None]
            kinds = Counter(link_kind(link) for link in links)
            await self._send(
                View(
                    epoch=view.epoch,
                    ready=view.ready,
                    estimated_samples=view.estimated_samples,
                    target_batch_size=view.target_batch_size,
                    samples_per_second=view.samples_per_second,
                    num_peers=view.num_peers,
                    links=dict(kinds),
                    link_rates=tuple(sorted((link_kind(link), link.throughput_bytes_per_s or 0.0) for link in links)),
                )
            )
            await asyncio.sleep(self.config.view_interval_s)

    # ------------------------------------------------------------------------------ rounds

    async def _average(self, request: Average) -> None:
        """Matchmake for the epoch, run the butterfly on the shared buffer, answer; never leaves it waiting."""
        if await self._skip_past(request):  # at once: not behind a catch-up download that holds the bulk lock
            return
        async with self._bulk:
            if await self._skip_past(request):
                return
            view = await self.tracker.wait_for_round_peers(request.epoch, ROUND_PEERS_WAIT_S)
            peers = view.peers if view.epoch == request.epoch else (self.me,)
            group = await self._matchmake(request.epoch, peers)
            if isinstance(group, str):
                await self._send(Averaged(request.epoch, False, (self.me,), {}, 0.0, group))
                return
            links = {m: link for m in group.members if m != self.me and (link := self.mesh.link(m)) is not None}
            rid = self.receipts.expect(group.round_id)  # members that finish first send claims at once
            result, report = await butterfly_allreduce(
                self._buffer,
                me=self.me,
                throughputs=group.throughputs,  # parts by the link throughputs the members claimed (DeDLOC)
                weight=request.weight,
                round_id=group.round_id,
                transport=LinkGroupTransport(links),
                codec=get_codec(self.config.compression),
            )
            self._buffer.copy_(result)
            self._next_epoch = request.epoch + 1
            excluded = {peer: f"{why.cause}: {why.detail}" for peer, why in report.excluded.items()}
            await self._send(
                Averaged(
                    request.epoch,
                    True,
                    group.members,
                    excluded,
                    report.averaged_fraction,
                    round_id=rid,
                    weight=request.weight,
                    bytes_sent=report.bytes_sent,
                )
            )
            members = tuple(member for member in group.members if member not in report.excluded)
            work = self.receipts.cosign(
                rid, epoch=request.epoch, members=members, samples=round(request.weight), report=report
            )
            task = asyncio.get_running_loop().create_task(self._deliver_receipt(work), name=f"hivewire-receipt-{rid}")
            self._receipt_tasks.add(task)
            task.add_done_callback(self._receipt_tasks.discard)

    async def _skip_past(self, request: Average) -> bool:
        """Answer "skipped" when the run is past the request's epoch: stepping now would fork the model."""
        epoch = self.tracker.view().epoch
        if epoch <= request.epoch:
            return False
        detail = f"the run is at epoch {epoch}, past ours ({request.epoch})"
        await self._send(Averaged(request.epoch, False, (self.me,), {}, 0.0, detail))
        return True

    async def _deliver_receipt(self, work: Coroutine[Any, Any, dict[str, Any] | None]) -> None:
        """Co-sign the round's receipt beside training, and hand it to the trainer (which uploads it)."""
        try:
            body = await work
        except Exception:  # a bug here must not take the session down: the round itself is done
            logger.exception("co-signing a round receipt failed")
            return
        if body is not None:
            await self._send(Receipt(body))

    async def _matchmake(self, epoch: int, peers: tuple[str, ...]) -> Group | str:
        """The agreed group, or why there is none; gives up as soon as the run moves past ``epoch``.

        Without that, a peer that proposes to members who already finished the epoch without it (it just
        joined) would wait out every agreement deadline while holding the bulk channels it needs to catch up.
        """
        matchmaking = asyncio.ensure_future(self.matchmaker.matchmake(epoch, peers))
        moved_on = asyncio.ensure_future(_poll_until(lambda: self.tracker.view().epoch > epoch, math.inf))
        try:
            await asyncio.wait({matchmaking, moved_on}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            moved_on.cancel()
            if not matchmaking.done():
                matchmaking.cancel()
                await asyncio.gather(matchmaking, return_exceptions=True)
        if matchmaking.cancelled():
            return f"the run moved past epoch {epoch} before a group agreed"
        try:
            return matchmaking.result()
        except RoundAbandoned as exc:
            return f"no group agreed: {exc}"

    # ------------------------------------------------------------------------------ late joiners

    async def _initial_state(self) -> StateBlob | None:
        """None to start from the seed; a neighbour's state when the run is already past epoch 0."""
        if not self.config.initial_peers:
            return None  # the first peer of the run
        if not await _poll_until(lambda: bool(self.tracker.records()), self.config.startup_wait_s):
            logger.warning(
                "heard no progress from the run's peers %s within %s s; starting from the initial model",
                self.config.initial_peers,
                self.config.startup_wait_s,
            )
            return None
        view = self.tracker.view()
        return await self._download(view.epoch, view.peers) if view.epoch > 0 else None

    def _behind(self) -> bool:
        """The run is past our epoch, not merely past the report of a round we just finished with it."""
        return self.tracker.view().epoch > max(self.tracker.local.epoch, self._next_epoch)

    def _donors(self) -> tuple[str, ...]:
        """Peers to download the run's state from: when we are behind, or when our parameters diverged.

        Divergence (a round that one member finished alone): among the peers at our epoch, the parameter
        hash most of them gossip wins, a tie going to the hash of the lowest peer id; its holders are donors.
        """
        view, local = self.tracker.view(), self.tracker.local
        if self._behind():
            return tuple(peer for peer in view.peers if peer != self.me)
        if view.epoch != local.epoch or local.param_hash is None:
            return ()
        hashes = {peer: digest for peer, digest in view.param_hashes.items() if digest is not None}
        counts = Counter(hashes.values())
        winner = max(counts, key=lambda digest: (counts[digest], -min(map(_rank, _holders(hashes, digest)))))
        return () if winner == local.param_hash else _holders(hashes, winner)

    def _loaded(self, state: StateBlob) -> bool:
        """The trainer reports the state we handed it (or a later one); a hash unknown to us cannot be told apart."""
        local = self.tracker.local
        same = state.param_hash is None or local.param_hash == state.param_hash
        return local.epoch > state.epoch or (local.epoch == state.epoch and same)

    async def _catch_up(self) -> None:
        """When the run is past our epoch or our parameters diverged, hand the trainer a neighbour's state."""
        while True:
            await asyncio.sleep(CATCH_UP_INTERVAL_S)
            if not self._donors():
                continue
            async with self._bulk:  # a round in flight may be the one that brings us level
                donors = self._donors()
                if not donors:
                    continue
                view = self.tracker.view()
                logger.warning(
                    "the run is at epoch %d and we at %d%s: downloading its state from %s",
                    view.epoch,
                    view.local_epoch,
                    "" if view.epoch > view.local_epoch else " with other parameters (a round we missed)",
                    ", ".join(donors[:MAX_DONORS]),
                )
                state = await self._download(view.epoch, donors)
            if state is None:
                continue
            await self._send(state)
            await _poll_until(functools.partial(self._loaded, state), LOADED_TIMEOUT_S)

    async def _download(self, epoch: int, peers: tuple[str, ...]) -> StateBlob | None:
        """The state of ``epoch`` in chunks from up to MAX_DONORS of ``peers`` at once; None when none delivers.

        The caller holds the bulk lock (or no round can run yet): the download reads the bulk channels.
        """
        donors = tuple(peer for peer in peers if peer != self.me)[:MAX_DONORS]
        try:
            donor_epoch, blob, served = await self.states.download(donors, max_epoch=epoch)
        except MeshError as exc:  # StateError: no offer, or chunks that could not all be had intact
            logger.warning("download of the state of epoch %d from %s failed: %s; will retry", epoch, list(donors), exc)
            return None
        records = self.tracker.records()
        hashes = [record.param_hash for peer in served if (record := records.get(peer)) and record.epoch == donor_epoch]
        return StateBlob(donor_epoch, blob, ", ".join(served), hashes[0] if hashes else None)

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"hivewire-network-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("network task %s failed", task.get_name(), exc_info=task.exception())
            self._inbox.put_nowait(Leave())
