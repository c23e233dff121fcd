"""State download for late joiners: the snapshot in hash-verified chunks, from every neighbour that has it.

The joiner sends ``state_request`` to each donor; a donor answers ``state_offer {epoch, size, sha256,
chunk_size, chunks}`` on the control channel, ``chunks`` being the SHA-256 of each ``chunk_size`` slice of
its snapshot. Donors at the same epoch hold bit-identical states (dedloc and diloco keep peers identical),
so their offers agree and each serves part of the download: the joiner asks ``state_chunk {sha256, index}``
of one donor at a time per link, receives the chunk as one bulk payload, and checks its SHA-256 against the
offer before keeping it. A donor that refuses, goes silent or sends a wrong chunk is dropped and its chunks
go to the others. A donor keeps its previous snapshot too, so one that moved to a new epoch mid-download still
serves the old one. The joiner refuses an oversized or inconsistent offer before any byte is read, and checks
the whole snapshot's size and SHA-256 at the end. The bytes are a `torch.save` of the strategy's state,
loaded with `weights_only=True` and checked by the strategy (shapes, dtypes, finiteness) before anything
changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hivewire.mesh import Link, LinkError, Mesh, MeshError, RecordSchema
from hivewire.mesh.errors import ControlRecordError

logger = logging.getLogger(__name__)

MAX_STATE_BYTES = 256 * 2**20  # the framing's payload limit
CHUNK_BYTES = 2**20  # a donor's chunk size, unless the snapshot needs bigger ones to stay within MAX_CHUNKS
MAX_CHUNK_BYTES = 16 * 2**20
MAX_CHUNKS = 512  # an offer lists every chunk's SHA-256: 512 x 66 bytes stays well within a control record
LINK_TIMEOUT_S = 30.0  # to link to a donor that is no neighbour (ICE, then a relay-only retry); a donor that
# left may otherwise keep the download, and the bulk channels it holds, waiting on the mesh's retries
OFFER_TIMEOUT_S = 10.0  # from our request to a donor's offer
CHUNK_TIMEOUT_S = 30.0  # from a chunk request to the chunk (1 MiB at aiortc's 5-20 MB/s, under contention)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_epoch(record: Mapping[str, Any]) -> None:
    if not 0 <= record["epoch"] < 2**40:
        raise ControlRecordError(f"{record['type']}.epoch: {record['epoch']} out of range")


def _check_offer(record: Mapping[str, Any]) -> None:
    if not 0 <= record["epoch"] < 2**40 or not 0 < record["size"] <= MAX_STATE_BYTES:
        raise ControlRecordError(f"state_offer: epoch {record['epoch']} or size {record['size']} out of range")
    if not 0 < record["chunk_size"] <= MAX_CHUNK_BYTES:
        raise ControlRecordError(f"state_offer.chunk_size: {record['chunk_size']} is outside 1..{MAX_CHUNK_BYTES}")
    expected = math.ceil(record["size"] / record["chunk_size"])
    chunks = record["chunks"]
    if len(chunks) != expected or expected > MAX_CHUNKS:
        raise ControlRecordError(
            f"state_offer.chunks: {len(chunks)} hashes for {expected} chunks (at most {MAX_CHUNKS})"
        )
    if not all(isinstance(digest, str) and _SHA256.fullmatch(digest) for digest in (record["sha256"], *chunks)):
        raise ControlRecordError("state_offer: every SHA-256 must be 64 lowercase hex digits")


def _check_chunk(record: Mapping[str, Any]) -> None:
    if not _SHA256.fullmatch(record["sha256"]) or not 0 <= record["index"] < MAX_CHUNKS:
        raise ControlRecordError(f"state_chunk: sha256 or index {record['index']} out of range")


STATE_REQUEST = RecordSchema("state_request", {"epoch": int}, _check_epoch)
STATE_OFFER = RecordSchema(
    "state_offer", {"epoch": int, "size": int, "sha256": str, "chunk_size": int, "chunks": list}, _check_offer
)
STATE_CHUNK = RecordSchema("state_chunk", {"sha256": str, "index": int}, _check_chunk)
STATE_REFUSED = RecordSchema("state_refused", {"reason": str})
STATE_SCHEMAS = (STATE_REQUEST, STATE_OFFER, STATE_CHUNK, STATE_REFUSED)


class StateError(MeshError):
    """A download failed: no donor offered a state, or none of them delivered every chunk intact."""


@dataclass(frozen=True)
class _Snapshot:
    epoch: int
    blob: bytes
    sha256: str
    chunk_size: int
    chunks: tuple[str, ...]

    @classmethod
    def of(cls, epoch: int, blob: bytes) -> _Snapshot:
        chunk_size = max(CHUNK_BYTES, math.ceil(len(blob) / MAX_CHUNKS))
        pieces = (blob[start : start + chunk_size] for start in range(0, len(blob), chunk_size))
        chunks = tuple(hashlib.sha256(piece).hexdigest() for piece in pieces)
        return cls(epoch, blob, hashlib.sha256(blob).hexdigest(), chunk_size, chunks)

    def offer(self) -> dict[str, Any]:
        return {
            "type": "state_offer",
            "epoch": self.epoch,
            "size": len(self.blob),
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
        }


@dataclass
class _Plan:
    """One download's progress, shared by the donors' fetchers."""

    missing: deque[int]  # chunk indices nobody is fetching
    pieces: dict[int, bytes] = field(default_factory=dict)
    served: list[str] = field(default_factory=list)  # donors that delivered at least one chunk, in order
    in_flight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class StateExchange:
    """Serves our latest snapshots to neighbours that ask, and downloads one from several neighbours."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._snapshots: deque[_Snapshot] = deque(maxlen=2)  # the latest and the one before it
        self._answers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        mesh.on_records(("state_request", "state_offer", "state_chunk", "state_refused"), self._on_record)

    def offer(self, epoch: int, blob: bytes) -> None:
        """Make ``blob`` (our state at the start of ``epoch``) what we serve from now on."""
        if len(blob) > MAX_STATE_BYTES:
            logger.error(
                "our state (%d bytes) exceeds %d bytes: late joiners cannot download it", len(blob), MAX_STATE_BYTES
            )
            return
        self._snapshots.append(_Snapshot.of(epoch, blob))

    async def download(self, donors: Sequence[str], *, max_epoch: int) -> tuple[int, bytes, tuple[str, ...]]:
        """The newest snapshot the donors offer up to ``max_epoch`` (the first donor's among equals): (epoch,
        bytes, the donors that served chunks).

        ``max_epoch`` is the run's epoch as most peers gossip it: one certified donor offering a later epoch
        is not believed. Every donor whose offer is the same snapshot (same SHA-256) serves chunks; StateError
        when no donor offers a state or the chunks cannot all be had intact."""
        offers = await asyncio.gather(*(self._ask_offer(donor) for donor in donors))
        answered = [(donor, offer) for donor, offer in zip(donors, offers, strict=True) if offer is not None]
        ahead = [donor for donor, offer in answered if offer["epoch"] > max_epoch]
        if ahead:
            logger.warning("ignored state offers from %s: past the run's epoch %d", ahead, max_epoch)
            answered = [(donor, offer) for donor, offer in answered if offer["epoch"] <= max_epoch]
        if not answered:
            raise StateError(f"no state offer up to epoch {max_epoch} from {list(donors)}")
        chosen = max((offer for _, offer in answered), key=lambda offer: offer["epoch"])  # the first of the newest
        sources = [donor for donor, offer in answered if offer["sha256"] == chosen["sha256"]]
        plan = _Plan(deque(range(len(chosen["chunks"]))))
        pieces, served = plan.pieces, plan.served
        await asyncio.gather(*(self._fetch(donor, chosen, plan) for donor in sources))
        if len(pieces) != len(chosen["chunks"]):
            raise StateError(
                f"{len(chosen['chunks']) - len(pieces)} chunks of the state could not be had from {sources}"
            )
        blob = b"".join(pieces[index] for index in range(len(pieces)))
        if len(blob) != chosen["size"] or hashlib.sha256(blob).hexdigest() != chosen["sha256"]:
            raise StateError(f"the state assembled from {served} does not match its offer (size or SHA-256)")
        logger.info(
            "downloaded the state of epoch %d (%d bytes, %d chunks) from %s",
            chosen["epoch"],
            len(blob),
            len(pieces),
            served,
        )
        return chosen["epoch"], blob, tuple(served)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------ downloading

    async def _ask_offer(self, donor: str) -> dict[str, Any] | None:
        """The donor's offer, or None (logged) when it refuses, cannot be reached or stays silent."""
        answer = self._answers[donor] = asyncio.get_running_loop().create_future()
        try:
            try:
                async with asyncio.timeout(LINK_TIMEOUT_S):
                    link = await self._mesh.connect(donor)
            except TimeoutError:
                logger.warning("cannot ask %s for its state: no link within %s s", donor, LINK_TIMEOUT_S)
                return None
            link.send_control({"type": "state_request", "epoch": 0})
            async with asyncio.timeout(OFFER_TIMEOUT_S):
                offer = await answer
        except TimeoutError:
            logger.warning("%s sent no state offer within %s s", donor, OFFER_TIMEOUT_S)
            return None
        except MeshError as exc:  # LinkError, or no link could be made
            logger.warning("cannot ask %s for its state: %s", donor, exc)
            return None
        finally:
            self._answers.pop(donor, None)
        if offer["type"] != "state_offer":
            logger.warning("%s refused to send its state: %s", donor, str(offer.get("reason", offer["type"]))[:200])
            return None
        return offer

    async def _fetch(self, donor: str, offer: Mapping[str, Any], plan: _Plan) -> None:
        """Fetch chunks of ``plan`` from ``donor`` until every chunk is in or the donor fails.

        A donor with nothing left to take waits while others have chunks in flight: a chunk a failing donor
        gives back goes to whichever donor is still working."""
        link = self._mesh.link(donor)
        while link is not None:
            if not plan.missing:
                if not plan.in_flight:
                    return
                plan.changed.clear()
                await plan.changed.wait()
                continue
            index = plan.missing.popleft()
            plan.in_flight += 1
            try:
                plan.pieces[index] = await self._chunk(link, offer, index)
            except StateError as exc:
                plan.missing.appendleft(index)
                logger.warning("state download: dropped %s as a donor: %s", donor, exc)
                return
            finally:
                plan.in_flight -= 1
                plan.changed.set()
            if donor not in plan.served:
                plan.served.append(donor)

    async def _chunk(self, link: Link, offer: Mapping[str, Any], index: int) -> bytes:
        """Chunk ``index`` of ``offer`` from ``link``'s peer, its SHA-256 checked; StateError otherwise."""
        refusal = self._answers[link.peer] = asyncio.get_running_loop().create_future()
        receive = asyncio.ensure_future(link.recv_payload())
        try:
            link.send_control({"type": "state_chunk", "sha256": offer["sha256"], "index": index})
            done, _ = await asyncio.wait(
                {refusal, receive}, timeout=CHUNK_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        except LinkError as exc:
            raise StateError(f"cannot ask for chunk {index}: {exc}") from exc
        finally:
            self._answers.pop(link.peer, None)
            if not receive.done():
                receive.cancel()
        if receive not in done:
            reason = refusal.result().get("reason", "") if refusal in done else f"nothing within {CHUNK_TIMEOUT_S} s"
            raise StateError(f"chunk {index}: {str(reason)[:200]}")
        try:
            _, data = receive.result()
        except LinkError as exc:
            raise StateError(f"the link closed during chunk {index}: {exc}") from exc
        expected = min(offer["chunk_size"], offer["size"] - index * offer["chunk_size"])
        if len(data) != expected or hashlib.sha256(data).hexdigest() != offer["chunks"][index]:
            raise StateError(f"chunk {index} ({len(data)} bytes) does not match its offer; refused")
        return bytes(data)

    # ------------------------------------------------------------------------------ serving

    def _on_record(self, sender: str, record: dict[str, Any]) -> None:
        if record["type"] in ("state_request", "state_chunk"):
            work = self._serve_offer(sender) if record["type"] == "state_request" else self._serve_chunk(sender, record)
            task = asyncio.get_running_loop().create_task(work, name=f"hivewire-state-{sender}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        answer = self._answers.get(sender)
        if answer is None or answer.done():
            logger.info("dropped a %s from %s: we asked it for nothing", record["type"], sender)
            return
        answer.set_result(record)

    async def _serve_offer(self, peer: str) -> None:
        link = self._mesh.link(peer)
        if link is None:
            return
        try:
            if not self._snapshots:
                link.send_control({"type": "state_refused", "reason": "no snapshot yet"})
                return
            link.send_control(self._snapshots[-1].offer())
        except LinkError as exc:
            logger.warning("could not send our state offer to %s: %s", peer, exc)

    async def _serve_chunk(self, peer: str, record: Mapping[str, Any]) -> None:
        link = self._mesh.link(peer)
        if link is None:
            return
        snapshot = next((kept for kept in self._snapshots if kept.sha256 == record["sha256"]), None)
        try:
            if snapshot is None or record["index"] >= len(snapshot.chunks):
                link.send_control({"type": "state_refused", "reason": "that state is no longer held here"})
                return
            start = record["index"] * snapshot.chunk_size
            await link.send_payload(snapshot.blob[start : start + snapshot.chunk_size])
            logger.info("sent chunk %d of the state of epoch %d to %s", record["index"], snapshot.epoch, peer)
        except LinkError as exc:
            logger.warning("could not send a state chunk to %s: %s", peer, exc)
