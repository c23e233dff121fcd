"""The trainer's handle on the network process: spawn it, feed it progress, average through shared memory.

The strategies take a synchronous `average(tensors, weight)`; `NetworkHandle.average` is one: it flattens
the tensors into the shared buffer, asks the network process for the epoch's round, blocks until the answer,
and hands back views of the buffer shaped like the input. Everything else the network says (views of the
run, a downloaded state, a co-signed round receipt) waits until the training loop polls for it between
micro-batches. Sends are locked: the certificate renewer (another thread) hands over renewed certificates.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections import deque

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


class NetworkHandle:
    """The network process and its Pipe, seen from the trainer."""

    def __init__(self, config: NetworkConfig, numel: int) -> None:
        # Shared memory: the network process averages this buffer in place, no tensor crosses the Pipe.
        self.buffer = torch.zeros(numel, dtype=torch.float32).share_memory_()
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=run_network, args=(config, child, self.buffer), name="hivewire-network", daemon=True
        )
        self._process.start()
        child.close()
        self.view: View | None = None
        self.pending: deque[StateBlob] = deque()
        self.receipts: deque[Receipt] = deque()  # co-signed, for the reporter to upload
        self.last_round: Averaged | None = None
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
        flat = torch.cat([tensor.detach().reshape(-1).to("cpu", torch.float32) for tensor in tensors])
        self.buffer.copy_(flat)
        self._send(Average(epoch, weight))
        answer = self._receive(ROUND_TIMEOUT_S, Averaged, f"to average epoch {epoch}")
        assert isinstance(answer, Averaged)
        self.last_round = answer
        if not answer.ok:
            raise RoundSkipped(f"epoch {epoch}: {answer.detail}")
        out, offset = [], 0
        for tensor in tensors:
            part = self.buffer[offset : offset + tensor.numel()]
            out.append(part.view_as(tensor).to(tensor.device, tensor.dtype, copy=True))
            offset += tensor.numel()
        return out

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

    def _take(self, message: object) -> None:
        if isinstance(message, View):
            self.view = message
        elif isinstance(message, StateBlob):
            self.pending.append(message)
        elif isinstance(message, Receipt):
            self.receipts.append(message)
        else:
            logger.warning("unexpected message from the network process: %s", type(message).__name__)
