"""State download for late joiners: ask a neighbour for its snapshot, receive it on the bulk channel, verify.

The joiner sends ``state_request``; the donor answers ``state_offer {epoch, size, sha256}`` on the control
channel, then the snapshot as one bulk payload (framing chunks it into frames within the channel's message
size, with backpressure). The joiner refuses an oversized offer before any byte is read, and a payload whose
size or SHA-256 differs from the offer. The bytes are a `torch.save` of the strategy's state, loaded with
`weights_only=True` and checked by the strategy (shapes, dtypes, finiteness) before anything changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Mapping
from typing import Any

from hivewire.mesh import LinkError, Mesh, MeshError, RecordSchema
from hivewire.mesh.errors import ControlRecordError

logger = logging.getLogger(__name__)

MAX_STATE_BYTES = 256 * 2**20  # the framing's payload limit; a bigger model needs chunked offers
OFFER_TIMEOUT_S = 10.0  # from our request to the donor's offer
TRANSFER_TIMEOUT_S = 120.0  # from the offer to the whole snapshot (a few MB at aiortc's 5-20 MB/s)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_epoch(record: Mapping[str, Any]) -> None:
    if not 0 <= record["epoch"] < 2**40:
        raise ControlRecordError(f"{record['type']}.epoch: {record['epoch']} out of range")


def _check_offer(record: Mapping[str, Any]) -> None:
    if not 0 <= record["epoch"] < 2**40 or not 0 < record["size"] <= MAX_STATE_BYTES:
        raise ControlRecordError(f"state_offer: epoch {record['epoch']} or size {record['size']} out of range")
    if not _SHA256.fullmatch(record["sha256"]):
        raise ControlRecordError("state_offer.sha256: expected 64 lowercase hex digits")


STATE_REQUEST = RecordSchema("state_request", {"epoch": int}, _check_epoch)
STATE_OFFER = RecordSchema("state_offer", {"epoch": int, "size": int, "sha256": str}, _check_offer)
STATE_REFUSED = RecordSchema("state_refused", {"reason": str})
STATE_SCHEMAS = (STATE_REQUEST, STATE_OFFER, STATE_REFUSED)


class StateError(MeshError):
    """A download failed: the donor refused, went silent, or sent bytes that do not match its offer."""


class StateExchange:
    """Serves our latest snapshot to neighbours that ask, and downloads one from a neighbour."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._snapshot: tuple[int, bytes, str] | None = None  # epoch, blob, sha256
        self._answers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        mesh.on_records(("state_request", "state_offer", "state_refused"), self._on_record)

    def offer(self, epoch: int, blob: bytes) -> None:
        """Make ``blob`` (our state at the start of ``epoch``) what we serve from now on."""
        self._snapshot = (epoch, blob, hashlib.sha256(blob).hexdigest())

    async def download(self, donor: str) -> tuple[int, bytes]:
        """The donor's snapshot (epoch, bytes), verified; StateError when it cannot be had."""
        link = await self._mesh.connect(donor)
        answer = self._answers[donor] = asyncio.get_running_loop().create_future()
        try:
            link.send_control({"type": "state_request", "epoch": 0})
            async with asyncio.timeout(OFFER_TIMEOUT_S):
                offer = await answer
        except TimeoutError:
            raise StateError(f"{donor} sent no state offer within {OFFER_TIMEOUT_S} s") from None
        except LinkError as exc:
            raise StateError(f"cannot ask {donor} for its state: {exc}") from exc
        finally:
            self._answers.pop(donor, None)
        if offer["type"] == "state_refused":
            raise StateError(f"{donor} refused to send its state: {offer['reason'][:200]}")
        try:
            async with asyncio.timeout(TRANSFER_TIMEOUT_S):
                _, blob = await link.recv_payload()
        except TimeoutError:
            raise StateError(
                f"{donor}'s state ({offer['size']} bytes) did not arrive in {TRANSFER_TIMEOUT_S} s"
            ) from None
        except LinkError as exc:
            raise StateError(f"the link to {donor} closed during the state download: {exc}") from exc
        if len(blob) != offer["size"] or hashlib.sha256(blob).hexdigest() != offer["sha256"]:
            raise StateError(f"{donor}'s state does not match its offer (size or SHA-256); refused")
        logger.info("downloaded the state of epoch %d from %s (%d bytes)", offer["epoch"], donor, len(blob))
        return offer["epoch"], bytes(blob)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_record(self, sender: str, record: dict[str, Any]) -> None:
        if record["type"] == "state_request":
            task = asyncio.get_running_loop().create_task(self._serve(sender), name=f"hivewire-state-{sender}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        answer = self._answers.get(sender)
        if answer is None or answer.done():
            logger.info("dropped a %s from %s: we asked it for nothing", record["type"], sender)
            return
        answer.set_result(record)

    async def _serve(self, peer: str) -> None:
        link = self._mesh.link(peer)
        if link is None:
            return
        try:
            if self._snapshot is None:
                link.send_control({"type": "state_refused", "reason": "no snapshot yet"})
                return
            epoch, blob, digest = self._snapshot
            link.send_control({"type": "state_offer", "epoch": epoch, "size": len(blob), "sha256": digest})
            await link.send_payload(blob)
            logger.info("sent the state of epoch %d to %s (%d bytes)", epoch, peer, len(blob))
        except LinkError as exc:
            logger.warning("could not send our state to %s: %s", peer, exc)
