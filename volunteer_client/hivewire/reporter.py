"""Progress reports from this peer to the server (docs/protocol.md, "Reports").

Each report is signed with the peer key and written to an on-disk queue (JSON lines) before anything is sent,
so a report survives a server outage and a client restart. The queue is sent oldest first in batches; a
report leaves it only once the server has answered for it. Resending is harmless: the server counts each
`report_id` once, so a batch whose answer was lost is simply sent again.
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
from collections.abc import Callable, Mapping
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
    signature = identity.private_key.sign(REPORT_CONTEXT + _canonical(body))
    return {**body, "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")}


def sign_receipt(identity: PeerIdentity, *, run: str, round_id: str, epoch: int, members: Mapping[str, int]) -> str:
    """This member's signature for a round receipt (docs/protocol.md, "Round receipts"): every member of the
    round signs the same bytes, built from the run, the round, and each member's samples by peer id."""
    body = {
        "run": run,
        "round_id": round_id,
        "epoch": int(epoch),
        "members": [[peer_id, int(samples)] for peer_id, samples in sorted(members.items())],
    }
    signature = identity.private_key.sign(RECEIPT_CONTEXT + _canonical(body))
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")


class ReportQueue:
    """Reports not yet answered, oldest first, mirrored in a JSON-lines file bounded to `max_bytes`.

    Appends are fsync'ed; removals rewrite the file and rename it over the old one, so a crash leaves either
    the old or the new queue. A line that does not parse (a write torn by a crash) is skipped on load.
    Not thread-safe by itself: `Reporter` holds a lock around it."""

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lines: list[str] = []
        self._bytes = 0  # the file's size: every line and its newline
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    if isinstance(json.loads(line).get("report_id"), str):
                        self._lines.append(line)
                        self._bytes += len(line.encode()) + 1
                        continue
                except (ValueError, AttributeError):
                    pass
                logger.warning("skipped line %d of the report queue %s: not a report", number, path)
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
                "the report queue %s is over %d bytes: dropped its %d oldest reports",
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

    def remove(self, report_ids: set[str]) -> None:
        self._lines = [line for line in self._lines if json.loads(line)["report_id"] not in report_ids]
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


@dataclass
class FlushResult:
    """What one flush did: report ids by the server's answer, and how many still wait in the queue."""

    accepted: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    pending: int = 0
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
        self._queue_lock = threading.Lock()  # guards the queue: report() and the sender run in different threads
        self._send_lock = threading.Lock()  # one flush at a time, so no batch is in flight twice
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None

    @property
    def pending(self) -> int:
        with self._queue_lock:
            return len(self._queue)

    def report(self, *, epoch: int, samples: int, loss: float, samples_per_second: float, link_types: LinkTypes) -> str:
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
        )
        with self._queue_lock:
            self._queue.append(signed)
        return str(signed["report_id"])

    def flush(self) -> FlushResult:
        """Sends the queue in batches until it is empty or the server cannot take more now."""
        result = FlushResult()
        with self._send_lock:
            while True:
                with self._queue_lock:
                    batch = self._queue.oldest(self.config.batch_size)
                if not batch:
                    break
                try:
                    answer = self._send(batch)
                except RequestRejected as exc:
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
                result.refused += [refusal.report_id for refusal in answer.refused if refusal.report_id]
                with self._queue_lock:
                    self._queue.remove({report["report_id"] for report in batch})
        result.pending = self.pending
        return result

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

    def close(self) -> None:
        """Stops the sender, tries one last flush, and closes the HTTP client; unsent reports stay on disk."""
        self._stop.set()
        if self._sender is not None:
            self._sender.join()
            self._sender = None
        self.flush()
        self._api.close()
