"""One side of a signed offer/answer exchange: build the peer connection and link, sign, wait, open.

The mesh decides whom to link to and resolves glare; this module only carries one attempt through and
guarantees that a link which is not handed back open is closed, so a failed ICE attempt leaves no
peer connection and no task behind (shared/notes/webrtc-field-notes.md, note 8).
"""

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription

from hivewire.identity import PeerIdentity
from hivewire.mesh.control import ControlCodec, RecordSchema
from hivewire.mesh.direct import DirectEndpoint
from hivewire.mesh.errors import LinkError, MeshError
from hivewire.mesh.ice import build_configuration
from hivewire.mesh.ice_timing import bound_connectivity_checks
from hivewire.mesh.link import Link, LinkSettings
from hivewire.mesh.relay import MESH_SCHEMAS
from hivewire.signaling.signed import VerifiedDescription, sign_description

logger = logging.getLogger(__name__)

# After policy-all ICE with a peer failed, offers to it go relay-only this long: the NATs between us rarely
# change sooner, and a pair that failed once for another reason (a peer gone mid-handshake) is soon back on
# policy all, direct where it can be.
RELAY_MEMORY_S = 300.0

# send(peer, kind, payload, via): deliver a signal, trying ``via`` (the path an offer came by) first.
SendSignal = Callable[[str, str, Mapping[str, Any], str | None], Coroutine[Any, Any, None]]


class Superseded(MeshError):
    """The attempt gave way to another one for the same peer (glare, or a newer offer)."""


class IceFailed(MeshError):
    """The descriptions were exchanged but the link did not open (ICE, DTLS or SCTP failed)."""


@dataclass(eq=False)
class Attempt:
    """One offer or answer in progress towards ``peer``; the mesh holds at most one per peer."""

    peer: str
    role: str  # "offer" or "answer"
    answer: "asyncio.Future[VerifiedDescription]"  # an offer's verified answer, set by the mesh
    task: "asyncio.Task[Link] | None" = None
    abandoned: str | None = None

    @classmethod
    def new(cls, peer: str, role: str) -> "Attempt":
        return cls(peer, role, _answer_future())

    @property
    def waiting_for_answer(self) -> bool:
        return self.role == "offer" and not self.answer.done()

    def abandon(self, reason: str) -> None:
        """Give way; the attempt's task notices at its next step and closes what it built."""
        self.abandoned = reason
        if not self.answer.done():
            self.answer.set_exception(Superseded(reason))

    def check(self) -> None:
        if self.abandoned is not None:
            raise Superseded(self.abandoned)


class Negotiator:
    """Carries attempts through for the peer ``identity``; ``send`` picks the signaling path."""

    def __init__(
        self,
        identity: PeerIdentity,
        certificate: Callable[[], str],
        ice_servers: Sequence[Mapping[str, Any]],
        *,
        send: SendSignal,
        link_settings: LinkSettings,
        answer_timeout_s: float,
        on_dead: Callable[[Link, str], None],
        schemas: Sequence[RecordSchema] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._identity = identity
        self._schemas = (*MESH_SCHEMAS, *schemas)  # each link's codec: the mesh's records and its consumers'
        self._certificate = certificate
        self._ice_servers = list(ice_servers)
        build_configuration(self._ice_servers)  # refuse a bad list now, not at the first link
        self._has_turn = any(url.startswith("turn") for url in _urls(self._ice_servers))
        # A doomed policy-all attempt must fail in seconds, not at open_timeout_s, for the relay-only retry
        # to come in time (ice_timing.py).
        bound_connectivity_checks()
        self._send = send
        self._link_settings = link_settings
        self._answer_timeout_s = answer_timeout_s
        self._on_dead = on_dead
        self.relay_only_retries = 0
        self._clock = clock
        self._relay_since: dict[str, float] = {}  # peer -> when policy-all ICE with it last failed
        self.direct: DirectEndpoint | None = None  # set by the mesh once listening; new links then try it

    async def offer(self, attempt: Attempt) -> Link:
        """Offer, apply the verified answer, open; once more relay-only if ICE failed and TURN exists.

        A peer whose policy-all ICE failed within RELAY_MEMORY_S gets a relay-only offer straight away: the
        NATs between us have most likely not changed, and a second doomed attempt would cost another CHECK_TIMEOUT_S.
        """
        if self._has_turn and self._relay_preferred(attempt.peer):
            logger.info("offering to %s relay-only: policy all failed with it recently", attempt.peer)
            return await self._offer(attempt, relay_only=True)
        try:
            return await self._offer(attempt, relay_only=False)
        except IceFailed as exc:
            if not self._has_turn:
                raise
            logger.warning("ICE to %s failed (%s); retrying once through the TURN relay only", attempt.peer, exc)
            self.relay_only_retries += 1
            attempt.answer = _answer_future()
            return await self._offer(attempt, relay_only=True)

    async def answer(self, attempt: Attempt, verified_offer: VerifiedDescription, via: str) -> Link:
        """Apply a verified offer, send the signed answer back the way the offer came (``via``), open.

        An offer that carries relay candidates only is the offerer's relay-only retry: answering with policy
        ``all`` beside it fails behind symmetric NATs as the first try did (webrtc-field-notes.md, note 7),
        so the answer goes relay-only too.
        """
        relay_only = self._has_turn and offers_relay_only(verified_offer.sdp)
        pc, link = self._new_link(attempt.peer, relay_only=relay_only)
        opened = False
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=verified_offer.sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            attempt.check()
            await self._send(attempt.peer, "answer", self._sign(attempt.peer, "answer", pc), via)
            await self._open(attempt, link, relay_only=relay_only)
            opened = True
            return link
        finally:
            if not opened:
                await link.close()

    async def _offer(self, attempt: Attempt, *, relay_only: bool) -> Link:
        pc, link = self._new_link(attempt.peer, relay_only=relay_only)
        opened = False
        try:
            await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate (no trickle)
            attempt.check()
            await self._send(attempt.peer, "offer", self._sign(attempt.peer, "offer", pc), None)
            try:
                verified = await asyncio.wait_for(attempt.answer, self._answer_timeout_s)
            except TimeoutError:
                raise MeshError(
                    f"no verified answer from {attempt.peer} within answer_timeout_s={self._answer_timeout_s}"
                ) from None
            # Exactly the verified SDP: the verifier matched its fingerprints with the signed ones.
            await pc.setRemoteDescription(RTCSessionDescription(sdp=verified.sdp, type="answer"))
            await self._open(attempt, link, relay_only=relay_only)
            opened = True
            return link
        finally:
            if not opened:
                await link.close()

    def _new_link(self, peer: str, *, relay_only: bool) -> tuple[RTCPeerConnection, Link]:
        """A peer connection and its link, channels created before any description (link.py)."""
        pc = RTCPeerConnection(build_configuration(self._ice_servers, relay_only=relay_only))
        codec = ControlCodec(self._schemas)
        link = Link(pc, peer=peer, settings=self._link_settings, codec=codec, on_dead=self._on_dead, direct=self.direct)
        return pc, link

    def _sign(self, peer: str, kind: str, pc: RTCPeerConnection) -> dict[str, Any]:
        sdp = pc.localDescription.sdp
        return sign_description(
            self._identity,
            self._certificate(),
            sender=self._identity.peer_id,
            receiver=peer,
            kind=kind,
            sdp=sdp,
            now=time.time(),
        )

    async def _open(self, attempt: Attempt, link: Link, *, relay_only: bool) -> None:
        """Wait for the channels; an attempt superseded meanwhile does not hand its link over."""
        try:
            await link.wait_open()
        except LinkError as exc:
            attempt.check()
            if not relay_only:
                self._relay_since[attempt.peer] = self._clock()
            raise IceFailed(str(exc)) from exc
        attempt.check()

    def _relay_preferred(self, peer: str) -> bool:
        """Whether policy-all ICE with ``peer`` failed (as offerer or answerer) less than RELAY_MEMORY_S ago."""
        failed_at = self._relay_since.get(peer)
        if failed_at is not None and self._clock() - failed_at >= RELAY_MEMORY_S:
            del self._relay_since[peer]
            return False
        return failed_at is not None


def offers_relay_only(sdp: str) -> bool:
    """True when the description carries ICE candidates and every one of them is a TURN relay candidate."""
    kinds = [
        line.split(" typ ", 1)[1].split()[0]
        for line in sdp.splitlines()
        if line.startswith("a=candidate:") and " typ " in line
    ]
    return bool(kinds) and all(kind == "relay" for kind in kinds)


def _answer_future() -> "asyncio.Future[VerifiedDescription]":
    """A future for an offer's answer. Abandon, bye or an undeliverable notice may fail it after the offer
    stopped waiting (superseded at an earlier step, timed out): that outcome is expected, so mark it seen."""
    future: asyncio.Future[VerifiedDescription] = asyncio.get_running_loop().create_future()
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


def _urls(ice_servers: Sequence[Mapping[str, Any]]) -> list[str]:
    urls: list[str] = []
    for server in ice_servers:
        value = server.get("urls")
        urls += [value] if isinstance(value, str) else [url for url in value or [] if isinstance(url, str)]
    return urls
