"""Progress reports and round receipts from this peer to the server (docs/protocol.md, "Reports", "Round receipts").

Each report is signed with the peer key and written to an on-disk queue (JSON lines) before anything is sent,
so a report survives a server outage and a client restart. The queue is sent oldest first in batches; a
report leaves it only once the server has answered for it. Resending is harmless: the server counts each
`report_id` once, so a batch whose answer was lost is simply sent again.

Round receipts (co-signed by a round's members in the network process, session/receipts.py) wait in a second
queue of the same kind and are uploaded one per request; the server stores each `round_id` once, so every
member of a round uploads it and the later uploads are answered "duplicate".
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field, ValidationError

from hivewire.api import HivewireAPI
from hivewire.errors import Forbidden, HivewireError, InvalidResponse, RequestRejected
from hivewire.identity import PeerIdentity

__all__ = [
    "MAX_BATCH",
    "FlushResult",
    "LinkTypes",
    "ReportQueue",
    "Reporter",
    "ReporterConfig",
    "receipt_signing_bytes",
    "sign_receipt",
    "sign_report",
]

logger = logging.getLogger(__name__)

REPORT_CONTEXT = b"hivewire-report-v1\n"
RECEIPT_CONTEXT = b"hivewire-receipt-v1\n"
# The server takes at most this many reports per request.
MAX_BATCH = 100


def _client_version() -> str:
    try:
        return importlib.metadata.version("hivewire")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class LinkTypes:
    """How many of this peer's links use each connection type."""

    # Direct on a local address (ICE host candidate).
    host: int = 0
    # Through a NAT mapping learned from STUN (server-reflexive).
    srflx: int = 0
    # Through a TURN relay.
    relay: int = 0
    # Direct TLS to a peer with a public address.
    direct_tls: int = 0


MAX_REPORTED_LINKS = 64  # the server refuses a report listing more
MAX_LINK_RATE = 1e12  # bytes/s: the server's bound (8 Tbit/s)


@dataclass(frozen=True)
class LinkRate:
    """One of this peer's links in a report: its type (as LinkTypes names them) and its measured payload rate."""

    type: str  # host, srflx, relay or direct_tls
    bytes_per_s: float  # 0 when not measured yet


def _reportable_rate(rate: float) -> float:
    return min(float(rate), MAX_LINK_RATE) if math.isfinite(rate) and rate >= 0 else 0.0


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign_report(
    identity: PeerIdentity,
    *,
    epoch: int,
    samples: int,
    loss: float,
    samples_per_second: float,
    link_types: LinkTypes,
    device_kind: str,
    now: float,
    client_version: str | None = None,
    links: Sequence[LinkRate] | None = None,
) -> dict[str, Any]:
    """A report with a fresh `report_id`, signed over the documented canonical bytes."""
    for name, value in (("loss", loss), ("samples_per_second", samples_per_second), ("time", now)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, not {value}")
    body: dict[str, Any] = {
        "report_id": str(uuid.uuid4()),
        "peer_id": identity.peer_id,
        "epoch": int(epoch),
        "samples": int(samples),
        "loss": float(loss),
        "samples_per_second": float(samples_per_second),
        "link_types": asdict(link_types),
        "client_version": client_version or _client_version(),
        "device_kind": device_kind,
        "time": float(now),
    }
    if links is not None:  # within the server's bounds: a rate that is no finite number >= 0 reads as unknown (0)
        body["links"] = [
            {"type": link.type, "bytes_per_s": _reportable_rate(link.bytes_per_s)}
            for link in links[:MAX_REPORTED_LINKS]
        ]
    signature = identity.private_key.sign(REPORT_CONTEXT + _canonical(body))
    return {**body, "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")}


def receipt_signing_bytes(*, run: str, round_id: str, epoch: int, members: Mapping[str, int]) -> bytes:
    """What every member of a round signs (docs/protocol.md, "Round receipts"): the run, the round, and each
    member's samples by peer id; the run is included so a receipt cannot be replayed into another run."""
    body = {
        "run": run,
        "round_id": round_id,
        "epoch": int(epoch),
        "members": [[peer_id, int(samples)] for peer_id, samples in sorted(members.items())],
    }
    return RECEIPT_CONTEXT + _canonical(body)


def sign_receipt(identity: PeerIdentity, *, run: str, round_id: str, epoch: int, members: Mapping[str, int]) -> str:
    """This member's signature for a round receipt, base64url without padding."""
    message = receipt_signing_bytes(run=run, round_id=round_id, epoch=epoch, members=members)
    return base64.urlsafe_b64encode(identity.private_key.sign(message)).rstrip(b"=").decode("ascii")


class ReportQueue:
    """Records not yet answered (reports, or receipts with `key="round_id"`), oldest first, mirrored in a
    JSON-lines file bounded to `max_bytes`.

    Appends are fsync'ed; removals rewrite the file and rename it over the old one, so a crash leaves either
    the old or the new queue. A line that does not parse (a write torn by a crash) is skipped on load.
    Not thread-safe by itself: `Reporter` holds a lock around it."""

    def __init__(self, path: Path, *, max_bytes: int, key: str = "report_id") -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.key = key
        self._lines: list[str] = []
        self._bytes = 0  # the file's size: every line and its newline
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    if isinstance(json.loads(line).get(key), str):
                        self._lines.append(line)
                        self._bytes += len(line.encode()) + 1
                        continue
                except (ValueError, AttributeError):
                    pass
                logger.warning("skipped line %d of the queue %s: no %s, a torn write", number, path, key)
            if self._trim():
                self._rewrite()

    def __len__(self) -> int:
        return len(self._lines)

    def _trim(self) -> bool:
        """Drops the oldest reports while the queue is over its bound; True if any went."""
        dropped = 0
        while self._lines and self._bytes > self.max_bytes:
            self._bytes -= len(self._lines.pop(0).encode()) + 1
            dropped += 1
        if dropped:
            logger.warning(
                "the queue %s is over %d bytes: dropped its %d oldest records",
                self.path,
                self.max_bytes,
                dropped,
            )
        return dropped > 0

    def _rewrite(self) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("w", encoding="utf-8") as file:
            file.writelines(line + "\n" for line in self._lines)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)

    def append(self, report: dict[str, Any]) -> None:
        line = json.dumps(report, separators=(",", ":"), allow_nan=False)
        self._lines.append(line)
        self._bytes += len(line.encode()) + 1
        if self._trim():
            self._rewrite()
            return
        with self.path.open("a", encoding="utf-8") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())

    def oldest(self, count: int) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._lines[:count]]

    def remove(self, ids: set[str]) -> None:
        self._lines = [line for line in self._lines if json.loads(line)[self.key] not in ids]
        self._bytes = sum(len(line.encode()) + 1 for line in self._lines)
        self._rewrite()


class _RefusedReport(BaseModel):
    report_id: str | None = Field(default=None, max_length=64)
    reason: str = Field(max_length=64)
    detail: str = Field(default="", max_length=1000)


class _ReportsAnswer(BaseModel):
    accepted: list[str] = Field(max_length=MAX_BATCH)
    duplicate: list[str] = Field(max_length=MAX_BATCH)
    refused: list[_RefusedReport] = Field(max_length=MAX_BATCH)


class _ReceiptAnswer(BaseModel):
    round_id: str = Field(max_length=64)
    status: str = Field(max_length=16)


@dataclass
class FlushResult:
    """What one flush did: report and round ids by the server's answer, and how many still wait."""

    accepted: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    pending: int = 0
    receipts_stored: list[str] = field(default_factory=list)  # stored now, or already (another member's upload)
    receipts_refused: list[str] = field(default_factory=list)
    receipts_pending: int = 0
    # Why sending stopped early (the server unreachable, a certificate refused), None when the queue emptied.
    error: HivewireError | None = None


@dataclass(frozen=True)
class ReporterConfig:
    # The queue file; reports wait there until the server answers for them.
    queue_path: Path
    # Largest queue file, bytes; beyond it the oldest reports are dropped (about 400 bytes a report).
    max_queue_bytes: int = 4 * 1024 * 1024
    # Reports per request, 1 to MAX_BATCH.
    batch_size: int = MAX_BATCH
    # Seconds between two flushes of the background sender (`start()`).
    flush_interval_s: float = 10.0
    # Seconds one HTTP request may take.
    request_timeout_s: float = 10.0
    # The receipts' queue file; None: next to queue_path, named <stem>-receipts.jsonl.
    receipt_queue_path: Path | None = None
    # Largest receipts queue file, bytes (a receipt carries its members' certificates: about 1 KB a member).
    max_receipt_queue_bytes: int = 4 * 1024 * 1024


class Reporter:
    """Signs, queues and sends this peer's progress reports for one run.

    `certificate` returns the peer's current certificate (it changes when renewed), sent as the bearer. Call
    `report()` from the training loop; either call `flush()` yourself or `start()` a background sender. Call
    `close()` at the end: it stops the sender and tries one last flush; what stays unsent waits on disk.
    """

    def __init__(
        self,
        server_url: str,
        run: str,
        identity: PeerIdentity,
        certificate: Callable[[], str],
        config: ReporterConfig,
        *,
        device_kind: str = "cpu",
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= config.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1 to {MAX_BATCH}, not {config.batch_size}")
        self.run = run
        self.identity = identity
        self.config = config
        self.device_kind = device_kind
        self._certificate = certificate
        self._clock = clock
        self._api = HivewireAPI(server_url, transport=transport, timeout_s=config.request_timeout_s)
        self._queue = ReportQueue(config.queue_path, max_bytes=config.max_queue_bytes)
        receipts_path = config.receipt_queue_path or config.queue_path.with_name(
            config.queue_path.stem + "-receipts.jsonl"
        )
        self._receipts = ReportQueue(receipts_path, max_bytes=config.max_receipt_queue_bytes, key="round_id")
        self._queue_lock = threading.Lock()  # guards the queue: report() and the sender run in different threads
        self._send_lock = threading.Lock()  # one flush at a time, so no batch is in flight twice
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self.reports_delivered = 0  # answered by the server (accepted or duplicate) since this reporter started
        self.receipts_delivered = 0  # stored (by us or by another member's upload)

    @property
    def pending(self) -> int:
        with self._queue_lock:
            return len(self._queue)

    @property
    def pending_receipts(self) -> int:
        with self._queue_lock:
            return len(self._receipts)

    def report(
        self,
        *,
        epoch: int,
        samples: int,
        loss: float,
        samples_per_second: float,
        link_types: LinkTypes,
        links: Sequence[LinkRate] | None = None,
    ) -> str:
        """Signs a report of the samples processed since the previous one and queues it; returns its id.

        Raises ValueError for a NaN or infinite loss or rate: the server would refuse it, so it is not queued."""
        signed = sign_report(
            self.identity,
            epoch=epoch,
            samples=samples,
            loss=loss,
            samples_per_second=samples_per_second,
            link_types=link_types,
            device_kind=self.device_kind,
            now=self._clock(),
            links=links,
        )
        with self._queue_lock:
            self._queue.append(signed)
        return str(signed["report_id"])

    def receipt(self, receipt: dict[str, Any]) -> None:
        """Queues a co-signed round receipt (the body of `POST /receipts`) for upload."""
        if not isinstance(receipt.get("round_id"), str):
            raise ValueError("a receipt needs a round_id")
        with self._queue_lock:
            self._receipts.append(receipt)

    def flush(self, deadline: float | None = None) -> FlushResult:
        """Sends the queues until they are empty, the server cannot take more now, or `deadline` (monotonic
        seconds) passed; a request under way when it passes still finishes (at most `request_timeout_s`)."""
        result = FlushResult()
        with self._send_lock:
            self._flush_reports(result, deadline)
            if result.error is None:
                self._flush_receipts(result, deadline)
        result.pending = self.pending
        result.receipts_pending = self.pending_receipts
        return result

    def _flush_reports(self, result: FlushResult, deadline: float | None) -> None:
        while deadline is None or time.monotonic() < deadline:
            with self._queue_lock:
                batch = self._queue.oldest(self.config.batch_size)
            if not batch:
                break
            try:
                answer = self._send(batch)
            except RequestRejected as exc:
                if exc.code == "retry":  # a concurrent upload of ours stored one of them first: send it again
                    logger.info("%d reports wait to be sent again: %s", self.pending, exc)
                    result.error = exc
                    break
                # The server cannot parse this batch at all; sending it again would block the queue forever.
                logger.error("the server refused a batch of %d reports, dropping it: %s", len(batch), exc)
                answer = _ReportsAnswer(accepted=[], duplicate=[], refused=[])
                result.refused += [report["report_id"] for report in batch]
            except HivewireError as exc:
                level = logging.ERROR if isinstance(exc, Forbidden) else logging.INFO
                logger.log(level, "%d reports wait for the server: %s", self.pending, exc)
                result.error = exc
                break
            for refusal in answer.refused:
                logger.warning(
                    "the server refused report %s: %s (%s)", refusal.report_id, refusal.reason, refusal.detail
                )
            result.accepted += answer.accepted
            result.duplicate += answer.duplicate
            self.reports_delivered += len(answer.accepted) + len(answer.duplicate)
            result.refused += [refusal.report_id for refusal in answer.refused if refusal.report_id]
            with self._queue_lock:
                self._queue.remove({report["report_id"] for report in batch})

    def _flush_receipts(self, result: FlushResult, deadline: float | None) -> None:
        """Uploads receipts oldest first, one per request; stops at the first the server cannot take now."""
        path = f"/api/runs/{self.run}/receipts"
        while deadline is None or time.monotonic() < deadline:
            with self._queue_lock:
                batch = self._receipts.oldest(1)
            if not batch:
                return
            receipt = batch[0]
            try:
                body = self._api.request("POST", path, json_body=receipt, bearer=self._certificate())
                answer = _ReceiptAnswer.model_validate(body)
                result.receipts_stored.append(answer.round_id)
                self.receipts_delivered += 1
                logger.info("receipt of round %s: %s", answer.round_id, answer.status)
            except RequestRejected as exc:
                if exc.code == "retry":  # a concurrent upload by another member: send it again later
                    logger.info("receipt of round %s: %s", receipt["round_id"], exc)
                    result.error = exc
                    return
                # Refused for good (a member's certificate, a signature, conflicting): resending changes nothing.
                logger.error("the server refused the receipt of round %s, dropping it: %s", receipt["round_id"], exc)
                result.receipts_refused.append(receipt["round_id"])
            except ValidationError as exc:
                logger.error("POST %s: the answer breaks the protocol: %s", path, exc.errors()[0]["msg"])
                result.error = InvalidResponse(f"POST {path}: the answer breaks the protocol")
                return
            except HivewireError as exc:
                level = logging.ERROR if isinstance(exc, Forbidden) else logging.INFO
                logger.log(level, "%d receipts wait for the server: %s", self.pending_receipts, exc)
                result.error = exc
                return
            with self._queue_lock:
                self._receipts.remove({receipt["round_id"]})

    def _send(self, batch: list[dict[str, Any]]) -> _ReportsAnswer:
        path = f"/api/runs/{self.run}/reports"
        body = self._api.request("POST", path, json_body={"reports": batch}, bearer=self._certificate())
        try:
            return _ReportsAnswer.model_validate(body)
        except ValidationError as exc:
            raise InvalidResponse(f"POST {path}: the answer breaks the protocol: {exc.errors()[0]['msg']}") from exc

    def start(self) -> None:
        """Starts the background sender: a flush every `flush_interval_s` until `close()`."""
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_forever, name="hivewire-reporter", daemon=True)
            self._sender.start()

    def _send_forever(self) -> None:
        while not self._stop.wait(self.config.flush_interval_s):
            try:
                self.flush()
            except OSError as exc:  # the queue file failed; the sender keeps going, so reports are not stranded
                logger.exception("sending reports failed: %s", exc)

    def close(self, timeout_s: float | None = None) -> FlushResult:
        """Stops the sender, tries one last flush (for about `timeout_s` at most, None: until it is done or the
        server fails), and closes the HTTP client; unsent reports and receipts stay on disk for the next run."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._stop.set()
        if self._sender is not None:
            self._sender.join()
            self._sender = None
        result = self.flush(deadline)
        self._api.close()
        return result
