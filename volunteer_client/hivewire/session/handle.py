"""The trainer's handle on the network process: spawn it, feed it progress, average through shared memory.

The strategies take a synchronous `average(tensors, weight)`; `NetworkHandle.average` is one: it flattens
the tensors into the shared buffer, asks the network process for the epoch's round, blocks until the answer,
and hands back copies shaped like the input. It is `start_average` (copy in, send, return at once) and
`finish_average` (wait for the answer, copy out) in a row; diloco's overlap calls them a window apart and
trains meanwhile, while the network process averages the buffer on its own event loop. Everything else the
network says (views of the run, a downloaded state, a co-signed round receipt, an early answer) waits until
the training loop polls for it between micro-batches. Sends are locked: the certificate renewer (another
thread) hands over renewed certificates.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import torch

from hivewire.errors import HivewireError
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
from hivewire.session.network import run_network

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # mesh start plus a late joiner's state download
LEAVE_TIMEOUT_S = 25.0  # to co-sign the last receipts (10 s), drain (5 s), close the mesh and exit; then terminated
ROUND_TIMEOUT_S = 300.0  # matchmaking (3 x 30 s) plus the butterfly's deadlines (30 + 30 s), with margin


class NetworkFailed(HivewireError):
    """The network process stopped or reported a failure; training cannot go on collaboratively."""

    advice = "Check the lines above for the cause; run `hivewire doctor <run url>` to test this machine's network."


class RoundSkipped(Exception):
    """The epoch's round did not happen (no group, or the run moved on): the step is skipped, work kept."""


@dataclass(frozen=True)
class _Round:
    """A round handed to the network process: its epoch and the shapes to cut the buffer back into."""

    epoch: int
    templates: tuple[tuple[torch.Size, torch.dtype, torch.device], ...]


class NetworkHandle:
    """The network process and its Pipe, seen from the trainer."""

    def __init__(self, config: NetworkConfig, numel: int) -> None:
        # Shared memory: the network process averages this buffer in place, no tensor crosses the Pipe.
        buffer = torch.zeros(numel, dtype=torch.float32).share_memory_()
        context = multiprocessing.get_context("spawn")
        conn, child = context.Pipe()
        process = context.Process(
            target=run_network, args=(config, child, buffer), name="hivewire-network", daemon=True
        )
        process.start()
        child.close()
        self._attach(conn, buffer, process)

    def _attach(self, conn: Connection, buffer: torch.Tensor, process: BaseProcess) -> None:
        """Take the Pipe's end, the shared buffer and the process (tests attach a Pipe they answer themselves)."""
        self.buffer = buffer
        self._conn, self._process = conn, process
        self.view: View | None = None
        self.pending: deque[StateBlob] = deque()
        self.receipts: deque[Receipt] = deque()  # co-signed, for the reporter to upload
        self.last_round: Averaged | None = None
        self._round: _Round | None = None  # submitted, its answer not yet collected
        self._abandoned: int | None = None  # the epoch of a round given up on, whose answer is still to come
        self._answers: dict[int, Averaged] = {}  # answers that arrived while polling, by epoch
        self._send_lock = threading.Lock()  # the Pipe's send is not thread-safe

    def _send(self, message: object) -> None:
        with self._send_lock:
            self._conn.send(message)

    def wait_started(self) -> StateBlob | None:
        """Block until the mesh is up and the initial state decided (a download for a late joiner)."""
        message = self._receive(START_TIMEOUT_S, Started, "to start the mesh")
        assert isinstance(message, Started)
        return message.state

    def report(self, epoch: int, samples: int, samples_per_second: float, param_hash: str | None = None) -> None:
        self._send(Report(epoch, samples, samples_per_second, param_hash))

    def snapshot(self, epoch: int, blob: bytes, param_hash: str) -> None:
        self._send(Snapshot(epoch, blob, param_hash))

    def renewed(self, certificate: str) -> None:
        """Hand a renewed certificate to the network process (called from the renewer's thread)."""
        try:
            self._send(Renewed(certificate))
        except (OSError, EOFError, ValueError) as exc:  # gone or closed: it will not need one any more
            logger.info("could not hand the renewed certificate to the network process: %s", exc)

    def poll(self) -> None:
        """Take in whatever the network process said since the last poll, without blocking."""
        while self._conn.poll():
            self._take(self._recv())

    def average(self, epoch: int, tensors: list[torch.Tensor], weight: float) -> list[torch.Tensor]:
        """The group's weighted mean of ``tensors`` for the round of ``epoch``; RoundSkipped without a round."""
        self.start_average(epoch, tensors, weight)
        return self.finish_average(epoch)

    @property
    def round_in_flight(self) -> int | None:
        """The epoch of the round submitted and not yet collected, if any."""
        return None if self._round is None else self._round.epoch

    def answered(self, epoch: int) -> bool:
        """Whether the answer of ``epoch``'s round came in a poll already, so `finish_average` would not wait."""
        return epoch in self._answers

    def start_average(self, epoch: int, tensors: list[torch.Tensor], weight: float) -> None:
        """Copy ``tensors`` into the shared buffer and ask for the epoch's round; returns without waiting."""
        if self._round is not None:
            raise RuntimeError(f"the round of epoch {self._round.epoch} is still in flight: finish it first")
        self._settle_abandoned()  # its butterfly may still write the buffer
        flat = torch.cat([tensor.detach().reshape(-1).to("cpu", torch.float32) for tensor in tensors])
        self.buffer.copy_(flat)
        self._send(Average(epoch, weight))
        self._round = _Round(epoch, tuple((tensor.shape, tensor.dtype, tensor.device) for tensor in tensors))

    def finish_average(self, epoch: int) -> list[torch.Tensor]:
        """Wait for the answer of the round ``start_average`` sent; copies of the averaged tensors.

        RoundSkipped when the round did not happen; NetworkFailed when no answer came in ROUND_TIMEOUT_S."""
        round_ = self._round
        if round_ is None or round_.epoch != epoch:
            raise RuntimeError(f"no round of epoch {epoch} in flight (in flight: {self.round_in_flight})")
        answer = self._answer(epoch)
        self._round = None
        self.last_round = answer
        if not answer.ok:
            raise RoundSkipped(f"epoch {epoch}: {answer.detail}")
        out, offset = [], 0
        for shape, dtype, device in round_.templates:
            numel = shape.numel()
            out.append(self.buffer[offset : offset + numel].view(shape).to(device, dtype, copy=True))
            offset += numel
        return out

    def abandon_average(self) -> None:
        """Give up on the round in flight (a downloaded state replaced what it carried); its answer is dropped."""
        if self._round is not None:
            logger.info("abandoned the round of epoch %d; its answer will be dropped", self._round.epoch)
            self._abandoned = self._round.epoch
            self._answers.pop(self._round.epoch, None)
            self._round = None

    def leave(self) -> None:
        """Ask the network process to leave the run and wait for it; terminate it if it lingers.

        Receipts it co-signs meanwhile (the last rounds') are kept in `receipts` for the reporter."""
        try:
            self._send(Leave())
            deadline = time.monotonic() + LEAVE_TIMEOUT_S
            while self._conn.poll(max(0.0, deadline - time.monotonic())):
                message = self._conn.recv()
                if isinstance(message, Receipt):
                    self.receipts.append(message)
                elif isinstance(message, Left | Failed):
                    break
        except (OSError, EOFError):
            pass  # it is gone already
        self._process.join(LEAVE_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("the network process did not exit within %s s; terminating it", LEAVE_TIMEOUT_S)
            self._process.terminate()
            self._process.join()
        self._conn.close()

    # ------------------------------------------------------------------------------------------

    def _recv(self) -> object:
        try:
            message = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise NetworkFailed(f"the network process exited (code {self._process.exitcode})") from exc
        if isinstance(message, Failed):
            raise NetworkFailed(message.reason, advice=message.advice)
        if isinstance(message, Left):
            raise NetworkFailed("the network process left the run (see the log above for why)")
        return message

    def _receive(self, timeout_s: float, kind: type, what: str) -> object:
        """The next message of ``kind``, taking in the others meanwhile; NetworkFailed after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._conn.poll(remaining):
                raise NetworkFailed(f"the network process took more than {timeout_s} s {what}")
            message = self._recv()
            if isinstance(message, kind):
                return message
            self._take(message)

    def _answer(self, epoch: int) -> Averaged:
        """The answer for ``epoch``'s round: taken in by a poll already, or the next one to come."""
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while epoch not in self._answers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NetworkFailed(f"the network process took more than {ROUND_TIMEOUT_S} s to average epoch {epoch}")
            self._take(self._receive(remaining, Averaged, f"to average epoch {epoch}"))
        return self._answers.pop(epoch)

    def _settle_abandoned(self) -> None:
        """Wait for an abandoned round's answer: until it came, the network process may write the buffer."""
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        while self._abandoned is not None:
            what = f"to end the abandoned round of epoch {self._abandoned}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NetworkFailed(f"the network process took more than {ROUND_TIMEOUT_S} s {what}")
            self._take(self._receive(remaining, Averaged, what))

    def _take(self, message: object) -> None:
        if isinstance(message, Averaged):
            if message.epoch == self._abandoned:
                self._abandoned = None
                logger.info("dropped the answer of the abandoned round of epoch %d", message.epoch)
            elif self._round is not None and message.epoch == self._round.epoch:
                self._answers[message.epoch] = message
            else:
                logger.warning("an answer for epoch %d, for which no round is in flight: dropped", message.epoch)
        elif isinstance(message, View):
            self.view = message
        elif isinstance(message, StateBlob):
            self.pending.append(message)
        elif isinstance(message, Receipt):
            self.receipts.append(message)
        else:
            logger.warning("unexpected message from the network process: %s", type(message).__name__)
