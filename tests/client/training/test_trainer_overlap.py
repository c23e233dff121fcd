"""The trainer with diloco's overlap, against a stand-in network process on a real Pipe (a thread): it keeps
training while a round is in flight, and leaves on the anchor after collecting the last round."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import pytest
import torch

from hivewire.recipes import TinyClassifier
from hivewire.session.handle import NetworkHandle
from hivewire.session.messages import Average, Averaged, Report, Started
from hivewire.session.trainer import TrainConfig, train

INNER_STEPS = 4
MAX_EPOCHS = 3
HOLD_REPORTS = 3  # a round's answer is held back until the trainer reported this many micro-batches after it
WAIT_S = 60.0  # the stand-in gives up holding after this long, so a trainer that blocks fails instead of hanging


@dataclass
class StandIn:
    """The network process's side of the Pipe: starts the trainer, answers every round with a group of two
    (the buffer left as it is: the mean of two equal members), but only once training went on beside it;
    the last round, which the trainer collects as it leaves, at once."""

    conn: Connection
    buffer: torch.Tensor
    rounds: list[int] = field(default_factory=list)  # epochs of the rounds asked for
    reports_while_held: list[int] = field(default_factory=list)  # per round, micro-batches reported meanwhile
    hashes: list[str | None] = field(default_factory=list)  # every hash reported

    def serve(self) -> None:
        self.conn.send(Started(None))
        held: Average | None = None
        reports = 0
        while self.conn.poll(WAIT_S if held is not None else 30.0):
            try:
                message = self.conn.recv()
            except EOFError:
                return
            if isinstance(message, Report):
                self.hashes.append(message.param_hash)
                reports += message.samples_accumulated > 0
            if isinstance(message, Average):
                self.rounds.append(message.epoch)
                held, reports = message, 0
                if message.epoch == MAX_EPOCHS - 1:
                    self._answer(held, reports)
                    held = None
            if held is not None and reports >= HOLD_REPORTS:
                self._answer(held, reports)
                held = None
        if held is not None:  # the trainer stopped reporting while its round was held: it blocked on it
            self._answer(held, reports)

    def _answer(self, request: Average, reports: int) -> None:
        self.reports_while_held.append(reports)
        self.conn.send(Averaged(request.epoch, True, ("me", "them"), {}, 1.0, weight=request.weight, bytes_sent=8))


@pytest.fixture
def stand_in() -> Iterator[tuple[NetworkHandle, StandIn]]:
    recipe = TinyClassifier()
    numel = sum(p.numel() for p in recipe.build_model(0).parameters())
    ours, theirs = multiprocessing.Pipe()
    handle = NetworkHandle.__new__(NetworkHandle)
    handle._attach(ours, torch.zeros(numel), multiprocessing.current_process())
    network = StandIn(theirs, handle.buffer)
    thread = threading.Thread(target=network.serve, daemon=True)
    thread.start()
    yield handle, network
    ours.close()
    thread.join(WAIT_S)
    theirs.close()


def test_training_goes_on_while_the_round_is_in_flight_and_ends_on_the_anchor(
    stand_in: tuple[NetworkHandle, StandIn],
) -> None:
    handle, network = stand_in
    config = TrainConfig(
        batch_size=16, device=torch.device("cpu"), max_epochs=MAX_EPOCHS, inner_steps=INNER_STEPS, overlap=True
    )
    result = train(TinyClassifier(), "diloco", "overlap-run", "p-alice", handle, config)

    assert network.rounds == [0, 1, 2]  # round k submitted at the end of window k
    assert network.reports_while_held == [HOLD_REPORTS, HOLD_REPORTS, 0]  # answered while training went on
    # the same windows of work as without overlap: --max-epochs 3 is three windows, the last collected on leaving
    assert (result.epoch, result.rounds, result.steps) == (MAX_EPOCHS, MAX_EPOCHS, MAX_EPOCHS * INNER_STEPS)
    assert not result.interrupted
    assert handle.round_in_flight is None
    assert network.hashes[-1] is not None and len(set(network.hashes)) == 4  # the anchor of epochs 0 to 3
