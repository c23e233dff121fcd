"""Butterfly all-reduce inside one group: reduce-scatter, then all-gather, with deadlines and exclusions.

The flat tensor is split by ``plan_partition``; member i reduces shard i. Stage 1 (reduce): every member
sends each reducer its values for that reducer's shard (a PART carrying its weight, the samples it
contributed); a reducer averages the parts it has, weighted, once all arrived or at ``reduce_timeout_s``.
Stage 2 (gather): each reducer sends its mean back to every member (a RESULT); a member waits for them
until ``gather_timeout_s`` after the reduce deadline. Each member sends and receives about
2·(n−1)/n of the tensor in all, the bandwidth-optimal amount.

What each member gets (codec ``none``): on every shard whose reducer delivered, the same bits on every
member: Σ wᵢ·xᵢ accumulated in float64 in sorted member order, divided by Σ wᵢ, rounded to the tensor's
dtype. With ``fp16``/``int8`` every member still gets the same bits, since the reducer decodes the very
bytes it sends, within the codec's error (compression.py) per hop.

Failures never hang the round, which ends by ``reduce_timeout_s + gather_timeout_s`` at the latest:

* a member that sends anything wrong (bad header, wrong shard or size, dtype, NaN/Inf, a second PART,
  oversize) is cut off: nothing more is read from it, no RESULT goes to it, and its part is dropped
  unless this member had already averaged it;
* a member whose link is lost is cut off too, but a part it delivered before counts;
* a PART that misses the reduce deadline is left out: the reducer re-normalises over the weights it has;
* a shard whose reducer is cut off or misses the gather deadline keeps this member's own values. No
  retry inside the round: a retry needs all survivors to agree on who failed, which is matchmaking's job;
  the report's ``kept_local``/``averaged_fraction`` tell the caller whether to run a round without them.

The report says who contributed to each averaged shard, who was excluded, at which stage and why.
"""

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from hivewire.averaging.compression import Codec
from hivewire.averaging.errors import PartRejected, PeerUnreachable
from hivewire.averaging.messages import HEADER as MESSAGE_HEADER
from hivewire.averaging.messages import KIND_PART, KIND_RESULT, encode_message, parse_message, round_tag
from hivewire.averaging.partition import Partition, plan_partition
from hivewire.averaging.transport import GroupTransport
from hivewire.buffers import empty_float_array

logger = logging.getLogger(__name__)


class Cause(StrEnum):
    """Why a member was excluded (its value is what reports and logs carry)."""

    BAD_MESSAGE = "bad_message"
    CONNECTION_LOST = "connection_lost"
    MISSED_REDUCE_DEADLINE = "missed_reduce_deadline"
    MISSED_GATHER_DEADLINE = "missed_gather_deadline"


_ADVICE = {
    Cause.BAD_MESSAGE: "an outdated or hostile client; if it repeats, the organizer can ban its account",
    Cause.CONNECTION_LOST: "its link closed; the mesh replaces dead links",
    Cause.MISSED_REDUCE_DEADLINE: "slow or stalled; raise reduce_timeout_s if its links are merely slow",
    Cause.MISSED_GATHER_DEADLINE: "slow or stalled; raise gather_timeout_s if its links are merely slow",
}


@dataclass(frozen=True)
class ButterflySettings:
    """Deadlines and bounds of one round; all members of a group should use the same values."""

    reduce_timeout_s: float = 30.0  # from the round's start until a reducer averages the parts it has
    gather_timeout_s: float = 30.0  # after the reduce deadline, until a member gives up on missing results
    max_weight: float = 1e12  # the largest weight (sample count) a member may claim

    def __post_init__(self) -> None:
        if not (self.reduce_timeout_s > 0 and self.gather_timeout_s > 0 and self.max_weight > 0):
            raise ValueError(f"timeouts and max_weight must be > 0, got {self}")


@dataclass(frozen=True)
class Exclusion:
    """Why a member's values are missing from this member's view of the round."""

    peer: str
    cause: Cause
    detail: str


@dataclass(frozen=True)
class RoundReport:
    """What one member saw of a round: enough to co-sign contributions and to decide on a retry."""

    round_id: str
    me: str
    partition: Partition
    contributors: dict[str, tuple[str, ...]]  # reducer -> members whose parts its delivered mean holds
    total_weight: dict[str, float]  # reducer -> the sum of the weights it averaged
    excluded: dict[str, Exclusion]  # first reason only; a late PART does not stop a member's RESULT counting
    kept_local: tuple[str, ...]  # reducers whose shard this member kept at its own values
    averaged_fraction: float  # elements that got a group mean / all elements
    bytes_sent: int
    bytes_received: int
    duration_s: float


async def butterfly_allreduce(
    tensor: torch.Tensor,
    *,
    me: str,
    throughputs: Mapping[str, float],
    weight: float,
    round_id: str,
    transport: GroupTransport,
    codec: Codec,
    settings: ButterflySettings | None = None,
) -> tuple[torch.Tensor, RoundReport]:
    """Average ``tensor`` (CPU, float32/float64, any shape, finite) with the group; return a new tensor and report.

    ``throughputs`` maps every member (its keys are the group) to its measured throughput, the same map on
    every member; ``weight`` is this member's sample count. ``tensor`` is not modified.
    """
    settings = settings or ButterflySettings()
    if me not in throughputs:
        raise ValueError(f"{me} is not in the group {sorted(throughputs)}")
    if not (math.isfinite(weight) and 0 <= weight <= settings.max_weight):
        raise ValueError(f"weight must be finite and in 0..{settings.max_weight:g}, got {weight!r}")
    if tensor.device.type != "cpu":
        raise ValueError(f"averaging takes a CPU tensor (shared with the trainer), got one on {tensor.device}")
    flat = tensor.detach().reshape(-1)
    if not np.isfinite(flat.numpy()).all():  # numpy's check runs ~25x faster than torch.isfinite here
        raise ValueError("the local tensor holds NaN or Inf; refusing to average it")
    partition = plan_partition(flat.numel(), throughputs)
    round_ = _Round(
        flat,
        me=me,
        partition=partition,
        weight=weight,
        round_id=round_id,
        transport=transport,
        codec=codec,
        settings=settings,
    )
    result, report = await round_.run()
    return result.view_as(tensor), report


_MEAN_BLOCK = 2**16  # elements per step of weighted_mean: its float64 scratch stays in the CPU's cache


def weighted_mean(parts: Sequence[torch.Tensor], scales: Sequence[float], divisor: float) -> torch.Tensor:
    """Σ scaleᵢ·partᵢ in float64, in the given order (each product rounded, then added), / ``divisor``,
    rounded to the parts' dtype.

    Block by block: the same bits as whole-tensor float64 arithmetic, ~4x faster at 50 MB, since the
    float64 intermediates never leave the cache; the mean itself goes into a pooled buffer (buffers.py).
    """
    arrays = [part.numpy() for part in parts]
    out = empty_float_array(arrays[0].size, arrays[0].dtype)
    accumulator = np.empty(min(_MEAN_BLOCK, out.size), dtype=np.float64)
    term = np.empty_like(accumulator)
    for start in range(0, out.size, _MEAN_BLOCK):
        stop = min(start + _MEAN_BLOCK, out.size)
        total, product = accumulator[: stop - start], term[: stop - start]
        np.multiply(arrays[0][start:stop], scales[0], out=total, dtype=np.float64)
        for array, scale in zip(arrays[1:], scales[1:], strict=True):
            np.multiply(array[start:stop], scale, out=product, dtype=np.float64)
            total += product
        total /= divisor
        out[start:stop] = total
    return torch.from_numpy(out)


class _Round:
    """One member's state in one round; its tasks live in one TaskGroup and end with the round."""

    def __init__(
        self,
        flat: torch.Tensor,
        *,
        me: str,
        partition: Partition,
        weight: float,
        round_id: str,
        transport: GroupTransport,
        codec: Codec,
        settings: ButterflySettings,
    ) -> None:
        self.flat, self.me, self.partition, self.round_id = flat, me, partition, round_id
        self.transport, self.codec, self.settings = transport, codec, settings
        self.tag = round_tag(round_id)
        self.index = partition.index(me)
        self.my_size = partition.sizes[self.index]
        self.others = [member for member in partition.members if member != me]
        self.reducers = [member for member in self.others if partition.size(member) > 0]
        self.parts: dict[str, tuple[float, torch.Tensor]] = {me: (weight, flat[partition.slice(self.index)])}
        self.results: dict[str, tuple[torch.Tensor, int, float]] = {}  # reducer -> (mean, mask, total weight)
        self.excluded: dict[str, Exclusion] = {}
        self.cut: set[str] = set()  # nothing more is read from or sent to these
        self.reduced = False
        self.sends: dict[asyncio.Task[None], str] = {}
        self.changed = asyncio.Event()
        self.bytes_sent = 0
        self.bytes_received = 0
        loop = asyncio.get_running_loop()
        self.time = loop.time
        self.started = loop.time()
        self.reduce_deadline = self.started + settings.reduce_timeout_s
        self.gather_deadline = self.reduce_deadline + settings.gather_timeout_s

    async def run(self) -> tuple[torch.Tensor, RoundReport]:
        async with asyncio.TaskGroup() as tasks:
            readers = [tasks.create_task(self._read(peer)) for peer in self.others]
            for peer in self.reducers:
                self._spawn_send(tasks, peer, self._encode_part(peer))
            await self._reduce(tasks)
            await self._wait_until(self._gather_complete, self.gather_deadline)
            for task in [*readers, *self.sends]:
                task.cancel()
        try:
            return self._finish()
        finally:
            # The tasks refer back to this round, so its buffers would wait for the cyclic garbage collector;
            # dropped now, their memory serves the next round at once (hivewire/buffers.py).
            self.parts.clear()
            self.results.clear()
            self.sends.clear()

    def _encode_part(self, peer: str) -> Callable[[], memoryview]:
        shard = self.partition.index(peer)

        def encode() -> memoryview:
            return encode_message(
                KIND_PART,
                shard=shard,
                tag=self.tag,
                weight=self.parts[self.me][0],
                contributors=0,
                codec=self.codec,
                values=self.flat[self.partition.slice(shard)],
            )

        return encode

    def _spawn_send(self, tasks: asyncio.TaskGroup, peer: str, message: Callable[[], memoryview]) -> None:
        self.sends[tasks.create_task(self._send(peer, message))] = peer

    async def _send(self, peer: str, message: Callable[[], memoryview]) -> None:
        data = message()
        try:
            await self.transport.send(peer, data)
        except PeerUnreachable as exc:
            self._cut(peer, Cause.CONNECTION_LOST, f"send failed: {exc}")
            return
        self.bytes_sent += len(data)
        self.changed.set()

    async def _read(self, peer: str) -> None:
        """Read messages from ``peer`` until it has sent all this member expects from it, or is cut off."""
        while self._expects_from(peer):
            try:
                data = await self.transport.recv(peer, timeout_s=max(0.0, self.gather_deadline - self.time()))
            except TimeoutError:
                return
            except PeerUnreachable as exc:
                self._cut(peer, Cause.CONNECTION_LOST, str(exc))
                return
            self.bytes_received += len(data)
            try:
                self._accept(peer, data)
            except PartRejected as exc:
                self._cut(peer, Cause.BAD_MESSAGE, str(exc))
                return
            self.changed.set()

    def _expects_from(self, peer: str) -> bool:
        if peer in self.cut:
            return False
        part_due = self.my_size > 0 and not self.reduced and peer not in self.parts
        return part_due or (peer in self.reducers and peer not in self.results)

    def _accept(self, peer: str, data: bytes | bytearray | memoryview) -> None:
        """Check one message from ``peer`` and keep what it carries; PartRejected if anything is wrong."""
        message = parse_message(data, group_size=len(self.partition.members), max_weight=self.settings.max_weight)
        if message.tag != self.tag:
            logger.debug("round %s: dropped a message of another round from %s", self.round_id, peer)
            return
        if message.kind == KIND_PART:
            if message.shard != self.index or self.my_size == 0:
                raise PartRejected(
                    f"PART for shard {message.shard} ({self.partition.sizes[message.shard]} elements) sent to "
                    f"{self.me}, which reduces shard {self.index} ({self.my_size} elements)"
                )
            if peer in self.parts:
                raise PartRejected("a second PART in one round")
            if self.reduced:
                return  # late: already excluded for missing the reduce deadline
            values = self.codec.decode(message.body, expected_numel=self.my_size, expected_dtype=self.flat.dtype)
            self.parts[peer] = (message.weight, values)
            return
        own_shard = self.partition.index(peer)
        if message.shard != own_shard or peer not in self.reducers:
            raise PartRejected(
                f"RESULT for shard {message.shard} from {peer}, which reduces shard {own_shard} "
                f"({self.partition.sizes[own_shard]} elements)"
            )
        if peer in self.results:
            raise PartRejected("a second RESULT in one round")
        size = self.partition.sizes[own_shard]
        values = self.codec.decode(message.body, expected_numel=size, expected_dtype=self.flat.dtype)
        self.results[peer] = (values, message.contributors, message.weight)

    async def _reduce(self, tasks: asyncio.TaskGroup) -> None:
        """Average this member's shard from the parts that came in time, then send the mean to everyone."""
        if self.my_size == 0:
            self.reduced = True
            return
        await self._wait_until(self._parts_complete, self.reduce_deadline)
        self.reduced = True
        for peer in self.others:
            if peer not in self.parts:
                detail = f"no PART within reduce_timeout_s={self.settings.reduce_timeout_s}"
                self._exclude(peer, Cause.MISSED_REDUCE_DEADLINE, detail)
        order = [member for member in self.partition.members if member in self.parts]
        weights = [self.parts[member][0] for member in order]
        total = sum(weights)
        divisor = total if total > 0 else float(len(order))  # all weights 0: a plain mean of what came
        scales = weights if total > 0 else [1.0] * len(order)
        mask = sum(1 << self.partition.index(member) for member in order)
        message = encode_message(
            KIND_RESULT,
            shard=self.index,
            tag=self.tag,
            weight=total,
            contributors=mask,
            codec=self.codec,
            values=weighted_mean([self.parts[member][1] for member in order], scales, divisor),
        )
        # Decode our own bytes so every member holds the very same values for this shard.
        body = message[MESSAGE_HEADER.size :]
        mean = self.codec.decode(body, expected_numel=self.my_size, expected_dtype=self.flat.dtype)
        self.results[self.me] = (mean, mask, total)
        for peer in self.others:
            if peer not in self.cut:
                self._spawn_send(tasks, peer, lambda: message)

    def _parts_complete(self) -> bool:
        return all(peer in self.parts or peer in self.excluded for peer in self.others)

    def _gather_complete(self) -> bool:
        results_in = all(peer in self.results or peer in self.cut for peer in self.reducers)
        sends_out = all(task.done() or peer in self.cut for task, peer in self.sends.items())
        return results_in and sends_out

    async def _wait_until(self, condition: Callable[[], bool], deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return

    def _cut(self, peer: str, cause: Cause, detail: str) -> None:
        """Stop talking to ``peer``; drop its part unless it was sound and only the link failed."""
        self.cut.add(peer)
        if cause is Cause.BAD_MESSAGE and not self.reduced:
            self.parts.pop(peer, None)
        self._exclude(peer, cause, detail)
        self.changed.set()

    def _exclude(self, peer: str, cause: Cause, detail: str) -> None:
        if peer in self.excluded:
            return
        self.excluded[peer] = Exclusion(peer, cause, detail)
        logger.warning(
            "averaging round %s: %s excluded %s (%s): %s; %s",
            self.round_id,
            self.me,
            peer,
            cause,
            detail,
            _ADVICE[cause],
        )

    def _finish(self) -> tuple[torch.Tensor, RoundReport]:
        kept_local = tuple(peer for peer in self.reducers if peer not in self.results)
        for peer in kept_local:
            detail = "no RESULT within reduce_timeout_s + gather_timeout_s; kept local values for its shard"
            self._exclude(peer, Cause.MISSED_GATHER_DEADLINE, detail)
        members = self.partition.members
        out = torch.from_numpy(empty_float_array(self.flat.numel(), self.flat.numpy().dtype))
        contributors: dict[str, tuple[str, ...]] = {}
        for index, member in enumerate(members):
            shard = self.partition.slice(index)
            if member in self.results:
                values, mask, _ = self.results[member]
                out[shard] = values
                contributors[member] = tuple(peer for i, peer in enumerate(members) if mask >> i & 1)
            else:
                out[shard] = self.flat[shard]  # kept local (or an empty shard)
        numel = self.flat.numel()
        averaged = sum(self.partition.size(reducer) for reducer in self.results)
        report = RoundReport(
            round_id=self.round_id,
            me=self.me,
            partition=self.partition,
            contributors=contributors,
            total_weight={reducer: total for reducer, (_, _, total) in self.results.items()},
            excluded=dict(self.excluded),
            kept_local=kept_local,
            averaged_fraction=averaged / numel if numel else 1.0,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            duration_s=self.time() - self.started,
        )
        logger.info(
            "averaging round %s: %s averaged %.1f%% of %d elements; %d of %d members excluded; %.2f s, "
            "%d bytes sent, %d received",
            self.round_id,
            self.me,
            100 * report.averaged_fraction,
            numel,
            len(self.excluded),
            len(members) - 1,
            report.duration_s,
            self.bytes_sent,
            self.bytes_received,
        )
        return out, report
