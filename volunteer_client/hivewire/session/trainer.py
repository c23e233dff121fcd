"""The training loop of `hivewire join`: nanoGPT's shape, with the averaging round behind the strategy's step.

Reads top to bottom: take in what the network said (the run's view, a downloaded state, co-signed round
receipts for the reporter), one micro-batch forward and backward, report progress, and at the epoch boundary
(the run reached its target batch, by the gossiped view) the strategy's step, which averages through the
network process. dedloc steps only at boundaries; diloco steps every micro-batch and averages every
`inner_steps`; with the run's `overlap` it submits the round at a window's end and collects it at the next
one (`NetworkRound`), training meanwhile. After each epoch a signed progress report goes to the server's
queue (reporter.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from hivewire.optim import Dedloc, Diloco, DilocoConfig, Strategy, StrategyError, state_hash
from hivewire.recipes import Recipe, shard_seed
from hivewire.reporter import LinkRate, LinkTypes, Reporter
from hivewire.session.handle import NetworkFailed, NetworkHandle, RoundSkipped
from hivewire.session.messages import StateBlob, View

logger = logging.getLogger(__name__)

LINE_INTERVAL_S = 0.5  # the live progress line is redrawn at most this often
REPORT_LINK_TYPES = {"host": "host", "reflexive": "srflx", "relay": "relay", "direct": "direct_tls"}  # View -> report


@dataclass(frozen=True)
class TrainConfig:
    """What the volunteer chose on the command line."""

    batch_size: int  # samples per micro-batch
    device: torch.device
    max_steps: int | None = None  # local micro-batches, then leave
    max_epochs: int | None = None  # the run's epochs (averaging rounds), then leave
    checkpoint_dir: Path | None = None  # where the final model is written (torch state dict)
    inner_steps: int = DilocoConfig.inner_steps  # diloco's H: local steps between two averaging rounds (the run's)
    overlap: bool = False  # diloco: average beside computation, the outer step one round late (the run's)


@dataclass
class TrainResult:
    """What happened, for the goodbye line and for tests."""

    steps: int = 0
    epoch: int = 0
    first_loss: float = math.nan  # mean over the first epoch's micro-batches
    last_loss: float = math.nan  # mean over the last epoch's micro-batches
    interrupted: bool = False
    checkpoint: Path | None = None
    losses: list[float] = field(default_factory=list)  # per epoch, mean over its micro-batches
    rounds: int = 0  # averaging rounds this peer completed with at least one other member
    samples_averaged: int = 0  # the samples this peer brought to those rounds
    bytes_sent: int = 0  # what those rounds sent (the data plane's cost; gossip and control records aside)


def run_seed(run: str) -> int:
    """Every peer of a run builds the same initial model: its seed comes from the run's name."""
    return int.from_bytes(hashlib.sha256(b"hivewire-run-seed\0" + run.encode()).digest()[:8], "big")


def build_strategy(
    name: str,
    recipe: Recipe,
    run: str,
    average: Callable[..., Any],
    inner_steps: int = DilocoConfig.inner_steps,
    overlap: bool = False,
) -> Strategy:
    """The run's strategy on the run's initial model; with diloco's overlap `average` is a StartFn."""
    model = recipe.build_model(run_seed(run))
    optimizer = recipe.optimizer(model)
    if name == "dedloc":
        return Dedloc(model, optimizer, average)
    return Diloco(model, optimizer, average, DilocoConfig(inner_steps=inner_steps, overlap=overlap))


class NetworkRound:
    """A round submitted to the network process beside computation (diloco's overlap): the strategy's Pending."""

    def __init__(self, network: NetworkHandle, epoch: int, tensors: list[torch.Tensor], weight: float) -> None:
        self._network, self._epoch = network, epoch
        network.start_average(epoch, tensors, weight)

    def done(self) -> bool:
        return self._network.answered(self._epoch)

    def result(self) -> list[torch.Tensor] | None:
        """The group's average; None (logged) when the round did not happen, so the local movement stands in."""
        try:
            return self._network.finish_average(self._epoch)
        except RoundSkipped as exc:
            logger.warning("%s; this window's local movement stands in for the round", exc)
            return None


def serialize(strategy: Strategy) -> bytes:
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    return buffer.getvalue()


def load_state(strategy: Strategy, state: StateBlob) -> bool:
    """Load a downloaded state after every check; False (and nothing changed) when one fails."""
    try:
        loaded = torch.load(io.BytesIO(state.blob), weights_only=True)
        before = serialize(strategy) if state.param_hash is not None else None
        strategy.load_state_dict(loaded)
    except (StrategyError, RuntimeError, ValueError, KeyError, EOFError) as exc:
        logger.warning("refused the state of epoch %d from %s: %s", state.epoch, state.donor, exc)
        return False
    if state.param_hash is not None and state_hash(strategy.agreed_state()) != state.param_hash:
        assert before is not None
        strategy.load_state_dict(torch.load(io.BytesIO(before), weights_only=True))
        logger.warning("refused the state from %s: its parameters do not match the hash it gossiped", state.donor)
        return False
    logger.info("loaded the state of epoch %d from %s", state.epoch, state.donor)
    return True


class ProgressLine:
    """One updating line on a terminal; a plain line per epoch otherwise (logs, CI)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._drawn_at = 0.0

    def update(self, text: str, *, epoch_done: bool) -> None:
        now = time.monotonic()
        if self._live and (epoch_done or now - self._drawn_at >= LINE_INTERVAL_S):
            self._stream.write("\r\033[K" + text)
            self._stream.flush()
            self._drawn_at = now
        elif not self._live and epoch_done:
            self._stream.write(text + "\n")
            self._stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (an event), printed above the live line."""
        self._stream.write(("\r\033[K" if self._live else "") + text + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._live:
            self._stream.write("\n")
            self._stream.flush()


class ServerReports:
    """The trainer's side of reporting: per-epoch progress reports and the network's receipts, to the queue.

    Reports count the samples processed since the previous one, so every sample is reported exactly once."""

    def __init__(self, reporter: Reporter | None) -> None:
        self._reporter = reporter
        self._reported = 0

    def progress(self, epoch: int, samples_seen: int, losses: list[float], rate: float, view: View | None) -> None:
        if self._reporter is None or samples_seen <= self._reported or not losses:
            return
        links = view.links if view is not None else {}
        kinds = LinkTypes(
            host=links.get("host", 0),
            srflx=links.get("reflexive", 0),
            relay=links.get("relay", 0),
            direct_tls=links.get("direct", 0),
        )
        rates = view.link_rates if view is not None else ()
        per_link = [LinkRate(REPORT_LINK_TYPES[kind], value) for kind, value in rates if kind in REPORT_LINK_TYPES]
        loss = sum(losses) / len(losses)
        try:
            self._reporter.report(
                epoch=epoch,
                samples=samples_seen - self._reported,
                loss=loss,
                samples_per_second=rate,
                link_types=kinds,
                links=per_link,
            )
        except ValueError as exc:  # a NaN loss: the server would refuse it; the samples go with the next report
            logger.warning("epoch %d: no progress report: %s", epoch, exc)
            return
        self._reported = samples_seen

    def receipts(self, network: NetworkHandle) -> None:
        while network.receipts:
            receipt = network.receipts.popleft()
            if self._reporter is not None:
                self._reporter.receipt(receipt.body)


def train(
    recipe: Recipe,
    strategy_name: str,
    run: str,
    peer_id: str,
    network: NetworkHandle,
    config: TrainConfig,
    reporter: Reporter | None = None,
) -> TrainResult:
    """Train until max steps/epochs or Ctrl-C; the caller leaves the run and closes the network afterwards."""
    overlap = config.overlap and strategy_name == "diloco"
    strategy: Strategy = build_strategy(
        strategy_name,
        recipe,
        run,
        (lambda tensors, weight: _submit(strategy, network, tensors, weight, rate))
        if overlap
        else (lambda tensors, weight: network.average(strategy.epoch, tensors, weight)),
        config.inner_steps,
        overlap,
    )
    strategy.model.to(config.device)
    result, line, reports = TrainResult(), ProgressLine(), ServerReports(reporter)
    state = network.wait_started()
    if state is not None and load_state(strategy, state):
        line.note(f"Downloaded the run's state at epoch {state.epoch} from {state.donor}")
    digest = state_hash(strategy.agreed_state())  # of this epoch's parameters, gossiped to detect divergence
    network.snapshot(strategy.epoch, serialize(strategy), digest)
    network.report(strategy.epoch, 0, 0.0, digest)
    epoch_losses: list[float] = []
    batches = recipe.batches(shard_seed(peer_id), config.batch_size, config.device)
    started, samples_seen, rate = time.monotonic(), 0, 0.0
    try:
        while not _done(result, strategy, config):
            # what the network said since the last micro-batch: the run's view, a state to catch up with
            network.poll()
            reports.receipts(network)
            while network.pending:
                state = network.pending.popleft()
                if load_state(strategy, state):
                    line.note(f"Caught up: downloaded the run's state at epoch {state.epoch} from {state.donor}")
                    network.abandon_average()  # the state replaced what a round in flight carried
                    epoch_losses.clear()
                    digest = state_hash(strategy.agreed_state())
                    network.snapshot(strategy.epoch, serialize(strategy), digest)
                    network.report(strategy.epoch, 0, 0.0, digest)
            # one micro-batch: forward, backward (gradients weighted by samples)
            batch = next(batches)
            loss = recipe.loss(strategy.model, batch)
            samples = recipe.samples_in(batch)
            strategy.backward(loss, samples)
            epoch_losses.append(loss.item())
            result.steps += 1
            samples_seen += samples
            rate = samples_seen / max(time.monotonic() - started, 1e-6)
            network.report(strategy.epoch, strategy.samples_accumulated, rate, digest)
            # the epoch boundary: dedloc steps when the run reached its target batch; diloco every batch
            epoch = strategy.epoch
            view = network.view
            if isinstance(strategy, Diloco) or (view is not None and view.ready and view.epoch == epoch):
                try:
                    strategy.step()
                except RoundSkipped as exc:  # nothing changed; the network side catches up or we retry
                    logger.warning("%s; keeping this epoch's gradients", exc)
                    network.view = None  # retry only on a view newer than the round's answer
            if strategy.epoch != epoch:
                result.losses.append(sum(epoch_losses) / len(epoch_losses))
                reports.progress(epoch, samples_seen, epoch_losses, rate, network.view)
                epoch_losses.clear()
                digest = _after_round(strategy, network, rate, result)
            line.update(
                _progress_text(strategy, network, epoch_losses, result, rate), epoch_done=strategy.epoch != epoch
            )
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        line.close()
    if isinstance(strategy, Diloco) and strategy.rounds_in_flight:
        _finish_in_flight(strategy, network, rate, result, line)
    elif isinstance(strategy, Diloco) and strategy.config.overlap:
        strategy.finish()  # nothing in flight: stand on the agreed anchor, as a blocking run ends
    reports.progress(strategy.epoch, samples_seen, epoch_losses, rate, network.view)  # the unfinished epoch's work
    result.epoch = strategy.epoch
    if result.losses:
        result.first_loss, result.last_loss = result.losses[0], result.losses[-1]
    if config.checkpoint_dir is not None and not result.interrupted:
        config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        result.checkpoint = config.checkpoint_dir / "model.pt"
        torch.save({key: value.cpu() for key, value in strategy.model.state_dict().items()}, result.checkpoint)
    return result


def _submit(
    strategy: Strategy, network: NetworkHandle, tensors: list[torch.Tensor], weight: float, rate: float
) -> NetworkRound:
    """Submit the epoch's round; when its outer step was only just applied (a late answer), announce the epoch
    first, so the network process matchmakes among the peers at it rather than alone."""
    network.report(strategy.epoch, 0, rate, state_hash(strategy.agreed_state()))
    return NetworkRound(network, strategy.epoch, tensors, weight)


def _done(result: TrainResult, strategy: Strategy, config: TrainConfig) -> bool:
    """Steps taken, or epochs reached counting a round in flight (collected on leaving): the same windows
    of work, with or without overlap, for the same --max-epochs."""
    return (config.max_steps is not None and result.steps >= config.max_steps) or (
        config.max_epochs is not None and strategy.epoch + strategy.rounds_in_flight >= config.max_epochs
    )


def _finish_in_flight(
    strategy: Diloco, network: NetworkHandle, rate: float, result: TrainResult, line: ProgressLine
) -> None:
    """Leaving with a round in flight: collect and apply it, so the group got our window and we end on the
    anchor every member holds. After Ctrl-C, or if the network cannot answer, abandon it instead (the network
    process still serves its part while it leaves) and end on the last agreed anchor."""
    epoch = strategy.epoch
    try:
        if result.interrupted:
            raise KeyboardInterrupt
        strategy.finish()
    except (NetworkFailed, KeyboardInterrupt) as exc:
        result.interrupted = result.interrupted or isinstance(exc, KeyboardInterrupt)
        strategy.abandon()
        network.abandon_average()
        line.note(f"Left the round of epoch {epoch} unfinished ({exc or 'interrupted'}); ending on epoch {epoch}")
        return
    if strategy.epoch != epoch:
        _after_round(strategy, network, rate, result)


def _after_round(strategy: Strategy, network: NetworkHandle, rate: float, result: TrainResult) -> str:
    """A round ended: tell the run our new epoch and hash, serve the new state to late joiners; the hash."""
    round_ = network.last_round
    if round_ is not None and round_.ok and len(round_.members) > 1:
        result.rounds += 1
        result.samples_averaged += round(round_.weight)
        result.bytes_sent += round_.bytes_sent
    if round_ is not None and round_.excluded:
        logger.warning("epoch %d: excluded from the round: %s", round_.epoch, round_.excluded)
    digest = state_hash(strategy.agreed_state())
    network.report(strategy.epoch, 0, rate, digest)  # the rate lets others extrapolate our samples at once
    network.snapshot(strategy.epoch, serialize(strategy), digest)
    return digest


def _describe_links(view: View) -> str:
    """ "direct 1 (412 MB/s), host 2 (18 MB/s)": each kind's count and the best rate measured on its links."""
    best: dict[str, float] = {}
    for kind, rate in view.link_rates:
        best[kind] = max(best.get(kind, 0.0), rate)
    return ", ".join(
        f"{kind} {count}" + (f" ({best[kind] / 1e6:.3g} MB/s)" if best.get(kind, 0.0) > 0 else "")
        for kind, count in sorted(view.links.items())
    )


def _progress_text(
    strategy: Strategy, network: NetworkHandle, epoch_losses: list[float], result: TrainResult, rate: float
) -> str:
    view = network.view
    loss = result.losses[-1] if result.losses and not epoch_losses else (sum(epoch_losses) / max(len(epoch_losses), 1))
    links = _describe_links(view) if view else ""
    if view is None:
        return f"epoch {strategy.epoch} | loss {loss:.3f} | local {rate:.0f} samples/s | waiting for the run's view"
    return (
        f"epoch {strategy.epoch} | loss {loss:.3f} | local {rate:.0f} samples/s | "
        f"global {view.samples_per_second:.0f} samples/s | {view.estimated_samples:.0f}/{view.target_batch_size} "
        f"| peers {view.num_peers} | links {links or 'none'}"
    )
