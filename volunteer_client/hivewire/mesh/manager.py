"""The mesh of one peer: links to a bounded set of neighbours, opened through signed, verified signaling.

Who links to whom is decided here; how a link moves bytes is link.py's job. The rules:

* Offers and answers are signed (``sign_description``) and applied only after ``DescriptionVerifier``
  accepted them; the SDP applied is exactly the verified one, whose fingerprints the verifier matched
  against the signed ones, so DTLS pins the certificate holder's key whatever path carried the signal.
* Signals go through the server while it answers, else through a neighbour (relay.py); answers go back
  first the way their offer came.
* Glare: when two peers offer to each other at once, the lower peer id's offer wins (neighbours.py); the
  other side abandons its own offer and answers.
* A dead link is dropped, its peer backs off, and the maintainer opens a link to another candidate. When
  ICE fails under policy ``all`` and a TURN server is configured, the offer is retried once relay-only
  (shared/notes/webrtc-field-notes.md, note 7), and offers to that peer go relay-only for a while
  (negotiation.RELAY_MEMORY_S). Connectivity checks are bounded (ice_timing.py), so a doomed attempt fails
  within seconds rather than at the link's open_timeout_s.
* Every task is owned and every link or peer connection is closed on every path, close() included.
* With ``settings.direct.enabled`` the mesh listens on one TCP port and every link tries the direct TLS
  path for its bulk payloads (direct.py); a link whose peer cannot be reached that way stays on WebRTC.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hivewire.identity import PeerIdentity
from hivewire.mesh.control import RecordSchema
from hivewire.mesh.direct import DirectEndpoint, DirectSettings
from hivewire.mesh.errors import LinkError, MeshError
from hivewire.mesh.link import Link, LinkSettings
from hivewire.mesh.negotiation import Attempt, Negotiator, Superseded
from hivewire.mesh.neighbours import Backoff, NeighbourTable, our_offer_wins
from hivewire.mesh.paths import NoSignalingPath, ServerPath, Signal, SignalingPath
from hivewire.mesh.relay import MAX_GOSSIPED_NEIGHBOURS, RelayPath
from hivewire.signaling import SignalingAuthError, SignalingClient
from hivewire.signaling.signed import DescriptionVerifier, VerifiedDescription

logger = logging.getLogger(__name__)

_REASON_CHARS = 200  # of a reason a peer sends in a bye
# close() waits this long for cancelled tasks and for each closing link; what is still stuck then is logged
# and left behind, so a wedged peer connection can never hang the volunteer's exit.
CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class MeshSettings:
    """How many links the mesh keeps and how long each signaling stage may take."""

    max_neighbours: int = 8  # links the mesh opens on its own to candidates
    max_links: int = 32  # hard cap, incoming offers and explicit connect() included
    answer_timeout_s: float = 20.0  # from sending an offer to a verified answer
    maintain_interval_s: float = 5.0  # the maintainer looks for room at least this often
    gossip_interval_s: float = 10.0  # neighbour lists are re-sent this often (and on every change)
    peers_request_interval_s: float = 30.0  # while below max_neighbours, ask the server for peers this often
    inbox_signals: int = 256  # signals waiting to be handled; more are dropped (senders retry)
    backoff: Backoff = field(default_factory=Backoff)
    link: LinkSettings = field(default_factory=LinkSettings)
    direct: DirectSettings = field(default_factory=DirectSettings)  # the direct TLS path for bulk payloads

    def __post_init__(self) -> None:
        if not 1 <= self.max_neighbours <= min(self.max_links, MAX_GOSSIPED_NEIGHBOURS):
            raise ValueError(f"need 1 <= max_neighbours <= max_links and <= {MAX_GOSSIPED_NEIGHBOURS}, got {self}")


@dataclass
class MeshStats:
    """Counters an operator reads to see how links formed and what was refused."""

    links_opened: int = 0
    links_lost: int = 0
    signals_sent: Counter[str] = field(default_factory=Counter)  # by path: "server", "relay"
    signals_refused: int = 0  # offers and answers that failed verification
    glare_yielded: int = 0  # our offers abandoned because the peer's won
    relay_only_retries: int = 0  # offers retried through TURN only after ICE failed
    offers_declined: int = 0  # offers we refused because max_links was reached


class Mesh:
    """Links of one peer. ``signaling`` (a SignalingClient) is owned: close() closes it.

    It is the ``GossipTransport`` of coordination: ``schemas`` are the record types beyond the mesh's own
    that its links accept (e.g. ``COORDINATION_SCHEMAS``), delivered to handlers set with ``on_records``.
    """

    def __init__(
        self,
        identity: PeerIdentity,
        certificate: Callable[[], str],
        verifier: DescriptionVerifier,
        *,
        ice_servers: Sequence[Mapping[str, Any]],
        signaling: SignalingClient | None = None,
        settings: MeshSettings | None = None,
        schemas: Sequence[RecordSchema] = (),
    ) -> None:
        self.peer_id = identity.peer_id
        self.settings = settings or MeshSettings()
        self.stats = MeshStats()
        # Known peers, backoff and gossiped neighbour lists; public for diagnostics.
        self.table = NeighbourTable(self.peer_id, backoff=self.settings.backoff, clock=time.monotonic)
        self._verifier = verifier
        self._negotiator = Negotiator(
            identity,
            certificate,
            ice_servers,
            send=self._send,
            link_settings=self.settings.link,
            answer_timeout_s=self.settings.answer_timeout_s,
            on_dead=self._on_link_dead,
            schemas=schemas,
        )
        # Relayed signaling; its counters (forwarded, dropped) are for operators and tests.
        self.relay = RelayPath(
            self.peer_id, links=lambda: self._links, table=self.table, deliver=self.on_signal, clock=time.monotonic
        )
        self._server = ServerPath(signaling, self) if signaling is not None else None
        self._links: dict[str, Link] = {}
        self._attempts: dict[str, Attempt] = {}
        self._inbox: asyncio.Queue[Signal] = asyncio.Queue(maxsize=self.settings.inbox_signals)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handlers: dict[str, list[Callable[[str, dict[str, Any]], None]]] = {}
        self._closing = False
        self.direct: DirectEndpoint | None = None  # our listener for the direct TLS path, once started

    # ------------------------------------------------------------------------------------------ public

    async def start(self, initial_peers: Iterable[str] = ()) -> None:
        """Learn the join response's peers, start signaling, the inbox and the maintainer."""
        self.table.add(initial_peers)
        if self.settings.direct.enabled:
            self.direct = DirectEndpoint(self.settings.direct)
            await self.direct.start()
            self._negotiator.direct = self.direct
        if self._server is not None:
            await self._server.start()
        self._spawn(self._consume_inbox(), "inbox")
        self._spawn(self._maintain(), "maintain")

    @property
    def neighbours(self) -> list[str]:
        """Peers we hold an open link to."""
        return sorted(self._links)

    @property
    def signaling_connected(self) -> bool:
        """True while the server's signaling path is up; new links then form through neighbours only."""
        return self._server is not None and self._server.connected

    def link(self, peer: str) -> Link | None:
        return self._links.get(peer)

    async def connect(self, peer: str) -> Link:
        """The open link to ``peer``, opening one if needed (backoff and max_neighbours do not apply)."""
        while True:
            if self._closing:
                raise MeshError("the mesh is closed")
            link = self._links.get(peer)
            if link is not None:
                return link
            attempt = self._attempts.get(peer)
            if attempt is None:
                if len(self._links) + len(self._attempts) >= self.settings.max_links:
                    raise MeshError(f"cannot link to {peer}: max_links={self.settings.max_links} reached")
                attempt = self._start_offer(peer)
            assert attempt.task is not None
            await asyncio.wait({attempt.task})
            if attempt.task.cancelled() or isinstance(attempt.task.exception(), Superseded):
                continue  # a glare winner or a newer offer took over; wait for that one
            return attempt.task.result()

    def send_control(self, peer: str, record: Mapping[str, Any]) -> None:
        """Send one record to neighbour ``peer``; LinkError when there is no open link to it."""
        link = self._links.get(peer)
        if link is None:
            raise LinkError(f"no open link to {peer}")
        link.send_control(record)

    def on_records(self, types: Collection[str], handler: Callable[[str, dict[str, Any]], None]) -> None:
        """Deliver every record of these types, from any neighbour, to ``handler`` (which must not block)."""
        for kind in types:
            self._handlers.setdefault(kind, []).append(handler)

    async def disconnect(self, peer: str) -> None:
        """Close our link to ``peer``; it backs off before the maintainer tries it again."""
        link = self._links.pop(peer, None)
        if link is None:
            return
        self._forget_neighbour(peer)
        self.table.failed(peer)
        await link.close()
        self._gossip()

    def on_signal(self, signal: Signal) -> None:
        """A path delivers a signal; handled in order by the inbox task."""
        try:
            self._inbox.put_nowait(signal)
        except asyncio.QueueFull:
            logger.warning(
                "signal inbox full (%d); dropped a %s from %s", self._inbox.maxsize, signal.kind, signal.sender
            )

    def on_presence(self, peer: str, joined: bool) -> None:
        if joined:
            self.table.add([peer])
            self._wake.set()
        else:
            self.table.remove(peer)

    def on_peers(self, peers: list[str]) -> None:
        if self.table.add(peers):
            self._wake.set()

    def on_undeliverable(self, peer: str, detail: str) -> None:
        """The server could not deliver a signal to ``peer`` (gone): fail our offer now, not at its timeout."""
        attempt = self._attempts.get(peer)
        if attempt is not None and attempt.waiting_for_answer:
            attempt.answer.set_exception(MeshError(f"the server cannot deliver to {peer}: {detail}"))

    async def close(self) -> None:
        """Stop every task, close every link and peer connection, and the signaling client."""
        if self._closing:
            return
        self._closing = True
        while self._tasks:  # a task may spawn another (a replaced link's close) while it winds down
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            if stuck:
                names = sorted(task.get_name() for task in stuck)
                logger.warning("mesh close: tasks still running after %.0f s, left behind: %s", CLOSE_TIMEOUT_S, names)
                self._tasks.difference_update(stuck)
        links, self._links = list(self._links.values()), {}
        closing = [asyncio.ensure_future(link.close()) for link in links]
        if closing:
            _, stuck = await asyncio.wait(closing, timeout=CLOSE_TIMEOUT_S)
            if stuck:
                logger.warning("mesh close: %d link(s) did not close within %.0f s", len(stuck), CLOSE_TIMEOUT_S)
        if self.direct is not None:
            await self.direct.close()
        if self._server is not None:
            await self._server.close()

    # ------------------------------------------------------------------------------------------ attempts

    def _start_offer(self, peer: str) -> Attempt:
        attempt = Attempt.new(peer, "offer")
        self._attempts[peer] = attempt
        attempt.task = self._spawn(self._run(attempt, self._negotiator.offer(attempt)), f"offer-{peer}")
        return attempt

    def _start_answer(self, offer: Signal, verified: VerifiedDescription) -> None:
        attempt = Attempt.new(offer.sender, "answer")
        self._attempts[offer.sender] = attempt
        work = self._negotiator.answer(attempt, verified, offer.via)
        attempt.task = self._spawn(self._run(attempt, work), f"answer-{offer.sender}")

    async def _run(self, attempt: Attempt, work: Coroutine[Any, Any, Link]) -> Link:
        """Run an offer or answer and adopt its link; on failure the peer backs off. Frees the slot either way."""
        peer = attempt.peer
        try:
            link = await work
            if self._closing:
                await link.close()
                raise MeshError("the mesh is closing")
            self._adopt(link)
            return link
        except Superseded as exc:
            logger.info("%s with %s abandoned: %s", attempt.role, peer, exc)
            raise
        except Exception as exc:  # whatever failed, it is this peer's attempt that failed, never the mesh
            delay = self.table.failed(peer)
            logger.warning("could not link to %s (%s): %s; next try in %.1f s", peer, attempt.role, exc, delay)
            if isinstance(exc, MeshError):
                raise
            raise MeshError(f"link to {peer} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if self._attempts.get(peer) is attempt:
                del self._attempts[peer]
            self.stats.relay_only_retries = self._negotiator.relay_only_retries
            self._wake.set()

    async def _send(self, peer: str, kind: str, payload: Mapping[str, Any], via: str | None) -> None:
        """Send through the server, else through neighbours; a reply to a relayed signal tries them first."""
        paths: list[SignalingPath] = [self._server] if self._server is not None else []
        paths.insert(0 if via not in (None, ServerPath.name) else len(paths), self.relay)
        problems = []
        for path in paths:
            try:
                await path.send_signal(peer, kind, payload)
            except NoSignalingPath as exc:
                problems.append(f"{path.name}: {exc}")
                continue
            self.stats.signals_sent[path.name] += 1
            return
        raise NoSignalingPath(f"cannot send {kind} to {peer}: " + "; ".join(problems))

    def _adopt(self, link: Link) -> None:
        peer = link.peer
        self._links[peer] = link
        self.table.add([peer])
        self.table.succeeded(peer)
        self.stats.links_opened += 1
        logger.info("linked to %s; %d neighbours", peer, len(self._links))
        self._spawn(self._read_control(link), f"control-{peer}")
        self._gossip()

    def _on_link_dead(self, link: Link, reason: str) -> None:
        if self._links.get(link.peer) is not link:
            return  # a link still being negotiated: its attempt reports the failure
        del self._links[link.peer]
        self._forget_neighbour(link.peer)
        self.stats.links_lost += 1
        if self._closing:
            return
        delay = self.table.failed(link.peer)
        logger.warning(
            "lost the link to %s (%s); linking to another candidate, %s again in %.1f s",
            link.peer,
            reason,
            link.peer,
            delay,
        )
        self._gossip()
        self._wake.set()

    def _forget_neighbour(self, peer: str) -> None:
        self.table.forget_neighbour(peer)
        self.relay.forget(peer)

    def _gossip(self) -> None:
        """Tell every neighbour whom we link to, so they can relay signaling through us."""
        record = {"type": "neighbours", "peers": sorted(self._links)[:MAX_GOSSIPED_NEIGHBOURS]}
        for link in list(self._links.values()):
            try:
                link.send_control(record)
            except LinkError as exc:
                logger.debug("neighbour list not sent to %s: %s", link.peer, exc)

    # ------------------------------------------------------------------------------------------ tasks

    async def _consume_inbox(self) -> None:
        while True:
            signal = await self._inbox.get()
            try:
                await self._handle(signal)
            except NoSignalingPath as exc:
                logger.warning("could not reply to a %s from %s: %s", signal.kind, signal.sender, exc)
            except Exception:  # one signal that trips a bug must not stop every later one
                logger.exception("handling a %s from %s via %s failed", signal.kind, signal.sender, signal.via)

    async def _handle(self, signal: Signal) -> None:
        peer = signal.sender
        if signal.kind == "bye":
            attempt = self._attempts.get(peer)
            if attempt is not None and attempt.waiting_for_answer:
                reason = str(signal.payload.get("reason", ""))[:_REASON_CHARS]
                attempt.answer.set_exception(MeshError(f"{peer} declined our offer: {reason or 'no reason given'}"))
            return
        if signal.kind == "candidate":
            return  # aiortc gathers before offering (no trickle ICE); candidates ride in the SDP
        if signal.kind == "offer":
            verified = await self._verify(signal)
            if verified is not None:
                await self._on_offer(signal, verified)
            return
        attempt = self._attempts.get(peer)
        if attempt is None or not attempt.waiting_for_answer:
            logger.info("dropped an answer from %s via %s: no offer of ours is waiting for it", peer, signal.via)
            return
        verified = await self._verify(signal)
        if verified is not None and not attempt.answer.done():
            attempt.answer.set_result(verified)

    async def _verify(self, signal: Signal) -> VerifiedDescription | None:
        """The verified description, or None after logging why it was refused (it changes nothing)."""
        try:
            # The certificate check may fetch the server's keys over blocking HTTP: keep it off the loop.
            return await asyncio.to_thread(self._verifier.verify, signal.sender, signal.kind, signal.payload)
        except SignalingAuthError as exc:
            self.stats.signals_refused += 1
            logger.warning("refused a %s from %s via %s: %s", signal.kind, signal.sender, signal.via, exc)
            return None

    async def _on_offer(self, offer: Signal, verified: VerifiedDescription) -> None:
        peer = offer.sender
        current = self._attempts.get(peer)
        if current is not None and current.role == "offer" and current.abandoned is None:
            if our_offer_wins(self.peer_id, peer):
                logger.info("glare with %s: our offer wins (lower peer id); ignoring theirs", peer)
                return
            self.stats.glare_yielded += 1
            current.abandon(f"glare: the offer of {peer} wins (lower peer id)")
        elif current is not None:
            current.abandon(f"a newer offer from {peer} replaces it")
        if peer not in self._links and len(self._links) + len(self._attempts) >= self.settings.max_links:
            self.stats.offers_declined += 1
            logger.info("declined an offer from %s: max_links=%d reached", peer, self.settings.max_links)
            await self._send(peer, "bye", {"reason": "full"}, offer.via)
            return
        old = self._links.pop(peer, None)
        if old is not None:
            logger.info("%s offered a new link; replacing the one we hold", peer)
            self._forget_neighbour(peer)
            self._spawn(old.close(), f"replace-{peer}")
        self._start_answer(offer, verified)

    async def _read_control(self, link: Link) -> None:
        async for record in link.control_records():
            if record["type"] == "relay":
                self.relay.on_record(link.peer, record)
            elif record["type"] == "neighbours":
                self.table.set_their_neighbours(link.peer, record["peers"])
                self._wake.set()
            else:
                for handler in self._handlers.get(record["type"], ()):
                    try:
                        handler(link.peer, record)
                    except Exception:  # a consumer's bug must not stop this link's control records
                        logger.exception("handler of %s records from %s failed", record["type"], link.peer)

    async def _maintain(self) -> None:
        """Keep max_neighbours links: offer to candidates, gossip, ask the server for peers."""
        settings = self.settings
        last_gossip = last_peers_request = -math.inf
        while not self._closing:  # close() may land between two awaits; never offer after it began
            self._wake.clear()
            busy = set(self._links) | set(self._attempts)
            room = settings.max_neighbours - len(busy)
            for peer in self.table.next_candidates(busy, room):
                self._start_offer(peer)
            now = time.monotonic()
            if now - last_gossip >= settings.gossip_interval_s:
                self._gossip()
                last_gossip = now
            if room > 0 and self._server is not None and now - last_peers_request >= settings.peers_request_interval_s:
                # Its answer may take request_timeout_s; the maintainer does not wait for it.
                self._spawn(self._server.request_peers(), "peers-request")
                last_peers_request = now
            retry_in = self.table.next_retry_in_s(busy)
            timeout = min(settings.maintain_interval_s, retry_in if retry_in is not None else math.inf)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands as the wake-up
            # fires, and this loop then outlived close() ("left behind" after 10 s).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(timeout, 0.0)):
                    await self._wake.wait()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> "asyncio.Task[Any]":
        task = asyncio.get_running_loop().create_task(coro, name=f"hivewire-mesh-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: "asyncio.Task[Any]") -> None:
        """Forget a finished task; attempts log their own failures (MeshError), anything else is a bug."""
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, MeshError):
            logger.error("mesh task %s failed", task.get_name(), exc_info=exc)
