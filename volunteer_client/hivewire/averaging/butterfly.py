"""Butterfly all-reduce inside one group: reduce-scatter, then all-gather, pipelined by chunks, with deadlines.

The flat tensor is split by ``plan_partition``; member i reduces shard i, and each shard is cut into chunks
(``plan_chunks``). Stage 1 (reduce): every member sends each reducer its values for that reducer's shard,
chunk by chunk (PARTs carrying its weight, the samples it contributed); a reducer averages chunk j, weighted,
as soon as every member's chunk j arrived (or at ``reduce_timeout_s``) and at once sends the mean back to
every member (stage 2, gather: RESULTs), while later chunks are still on their way. A member waits for the
RESULTs until ``gather_timeout_s`` after the reduce deadline. Each member sends and receives about
2·(n−1)/n of the tensor in all, the bandwidth-optimal amount; the pipeline keeps both directions of every
link busy, where two whole stages left each link idle one way at a time and the gather waited for the
slowest part (gloo's ring pipelines its steps the same way).

What each member gets (codec ``none``): on every chunk whose reducer delivered, the same bits on every
member: Σ wᵢ·xᵢ accumulated in float64 in sorted member order, divided by Σ wᵢ, rounded to the tensor's
dtype (the same bits whatever the chunking). With ``fp16``/``int8`` every member still gets the same bits,
since the reducer decodes the very bytes it sends, within the codec's error (compression.py) per hop.

Failures never hang the round, which ends by ``reduce_timeout_s + gather_timeout_s`` at the latest:

* a member that sends anything wrong (bad header, wrong shard, chunk, size, dtype or weight, NaN/Inf, a
  chunk twice, oversize) is cut off: nothing more is read from it, no RESULT goes to it, and its chunks
  are dropped unless this member had already averaged them;
* a member whose link is lost is cut off too, but the chunks it delivered count;
* a member whose PART chunks miss the reduce deadline is left out of the chunks still missing: the
  reducer re-normalises over the weights it has;
* chunks whose reducer is cut off or misses the gather deadline keep this member's own values. No retry
  inside the round: a retry needs all survivors to agree on who failed, which is matchmaking's job; the
  report's ``kept_local``/``averaged_fraction`` tell the caller whether to run a round without them.

The report says who contributed to each averaged shard (the members in every chunk of it this member got,
and the smallest total weight among those chunks: the two differ between chunks only in a round that
excluded someone), who was excluded, at which stage and why.
"""

import asyncio
import functools
import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from hivewire.averaging.compression import Codec
from hivewire.averaging.errors import PartRejected, PeerUnreachable
from hivewire.averaging.messages import HEADER as MESSAGE_HEADER
from hivewire.averaging.messages import KIND_PART, KIND_RESULT, encode_message, parse_message, round_tag
from hivewire.averaging.partition import Partition, plan_chunks, plan_partition
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
    # The pipeline's grain (partition.plan_chunks): about this many chunks per shard, each of this many
    # elements at least (per-message costs) and at most (a reducer returns chunk j while later ones travel).
    chunks_per_shard: int = 16
    min_chunk_elements: int = 2**15  # 128 KiB of float32: 4 payloads of link credit still fill a 40 ms RTT
    max_chunk_elements: int = 2**20  # 4 MiB of float32

    def __post_init__(self) -> None:
        if not (self.reduce_timeout_s > 0 and self.gather_timeout_s > 0 and self.max_weight > 0):
            raise ValueError(f"timeouts and max_weight must be > 0, got {self}")
        if not (self.chunks_per_shard >= 1 and 1 <= self.min_chunk_elements <= self.max_chunk_elements):
            raise ValueError(f"need chunks_per_shard >= 1 and 1 <= min_chunk_elements <= max_chunk_elements: {self}")


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


def chunk_slices(partition: Partition, index: int, settings: ButterflySettings) -> list[slice]:
    """Where each chunk of shard ``index`` lies in the flat tensor (plan_chunks under ``settings``)."""
    start = partition.slice(index).start
    slices = []
    for size in plan_chunks(
        partition.sizes[index],
        target_chunks=settings.chunks_per_shard,
        min_elements=settings.min_chunk_elements,
        max_elements=settings.max_chunk_elements,
    ):
        slices.append(slice(start, start + size))
        start += size
    return slices


def _check_chunk(kind: str, chunk: int, expected: int, count: int) -> None:
    """Each kind's chunks come in index order, each once: PartRejected for any other."""
    if chunk < expected:
        raise PartRejected(f"a second {kind} for chunk {chunk} in one round")
    if chunk >= count:
        raise PartRejected(f"{kind} chunk {chunk} beyond the shard's {count} chunks")
    if chunk != expected:
        raise PartRejected(f"{kind} chunk {chunk} out of order: chunk {expected} was due")


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
        self.others = [member for member in partition.members if member != me]
        self.reducers = [member for member in self.others if partition.size(member) > 0]
        self.chunks = [chunk_slices(partition, index, settings) for index in range(len(partition.members))]
        self.my_chunks = self.chunks[self.index]
        self.out = torch.from_numpy(empty_float_array(flat.numel(), flat.numpy().dtype))
        self.weights: dict[str, float] = {me: weight}  # each member's PART weight, from its first chunk
        self.parts: dict[str, list[torch.Tensor | None]] = {}  # member -> its PART chunks, None once reduced
        self.dropped: set[str] = set()  # members whose chunks not yet reduced no longer count (bad messages)
        self.masks: dict[str, list[int]] = {}  # reducer -> contributors of each RESULT chunk in so far
        self.totals: dict[str, list[float]] = {}  # reducer -> total weight of each RESULT chunk in so far
        self.excluded: dict[str, Exclusion] = {}
        self.cut: set[str] = set()  # nothing more is read from or sent to these
        self.outboxes: dict[str, asyncio.Queue[Callable[[], memoryview]]] = {
            peer: asyncio.Queue() for peer in self.others
        }
        self.unsent = dict.fromkeys(self.others, 0)  # messages queued or being sent, per member
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
            workers = [tasks.create_task(self._read(peer)) for peer in self.others]
            workers += [tasks.create_task(self._send(peer)) for peer in self.others]
            for peer in self.reducers:
                shard = self.partition.index(peer)
                for chunk in range(len(self.chunks[shard])):
                    self._enqueue(peer, functools.partial(self._encode_part, shard, chunk))
            await self._reduce()
            await self._wait_until(self._gather_complete, self.gather_deadline)
            for task in workers:
                task.cancel()
        try:
            return self._finish()
        finally:
            # The tasks refer back to this round, so its buffers would wait for the cyclic garbage collector;
            # dropped now, their memory serves the next round at once (hivewire/buffers.py).
            self.parts.clear()
            self.outboxes.clear()
            del self.out

    def _encode_part(self, shard: int, chunk: int) -> memoryview:
        return encode_message(
            KIND_PART,
            shard=shard,
            chunk=chunk,
            tag=self.tag,
            weight=self.weights[self.me],
            contributors=0,
            codec=self.codec,
            values=self.flat[self.chunks[shard][chunk]],
        )

    def _enqueue(self, peer: str, message: Callable[[], memoryview]) -> None:
        self.unsent[peer] += 1
        self.outboxes[peer].put_nowait(message)

    async def _send(self, peer: str) -> None:
        """Send ``peer`` its messages in the order they were queued, each encoded only when its turn comes."""
        outbox = self.outboxes[peer]
        while True:
            message = await outbox.get()
            if peer in self.cut:
                return  # nothing more goes to a member cut off
            data = message()
            try:
                await self.transport.send(peer, data)
            except PeerUnreachable as exc:
                self._cut(peer, Cause.CONNECTION_LOST, f"send failed: {exc}")
                return
            self.bytes_sent += len(data)
            self.unsent[peer] -= 1
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
        part_due = peer not in self.excluded and len(self.parts.get(peer, ())) < len(self.my_chunks)
        return part_due or self._results_missing(peer)

    def _results_missing(self, peer: str) -> bool:
        """Whether some chunk of ``peer``'s shard has no RESULT here yet (never, for an empty shard)."""
        return len(self.masks.get(peer, ())) < len(self.chunks[self.partition.index(peer)])

    def _accept(self, peer: str, data: bytes | bytearray | memoryview) -> None:
        """Check one message from ``peer`` and keep what it carries; PartRejected if anything is wrong."""
        message = parse_message(data, group_size=len(self.partition.members), max_weight=self.settings.max_weight)
        if message.tag != self.tag:
            logger.debug("round %s: dropped a message of another round from %s", self.round_id, peer)
            return
        if message.kind == KIND_PART:
            if message.shard != self.index or not self.my_chunks:
                raise PartRejected(
                    f"PART for shard {message.shard} ({self.partition.sizes[message.shard]} elements) sent to "
                    f"{self.me}, which reduces shard {self.index} ({self.partition.sizes[self.index]} elements)"
                )
            received = self.parts.setdefault(peer, [])
            _check_chunk("PART", message.chunk, len(received), len(self.my_chunks))
            if self.weights.setdefault(peer, message.weight) != message.weight:
                raise PartRejected(f"PART weight changed from {self.weights[peer]!r} to {message.weight!r}")
            if peer in self.excluded:
                received.append(None)  # late: excluded at the reduce deadline; counted, never averaged
                return
            where = self.my_chunks[message.chunk]
            values = self.codec.decode(
                message.body, expected_numel=where.stop - where.start, expected_dtype=self.flat.dtype
            )
            received.append(values)
            return
        own_shard = self.partition.index(peer)
        if message.shard != own_shard or peer not in self.reducers:
            raise PartRejected(
                f"RESULT for shard {message.shard} from {peer}, which reduces shard {own_shard} "
                f"({self.partition.sizes[own_shard]} elements)"
            )
        masks = self.masks.setdefault(peer, [])
        _check_chunk("RESULT", message.chunk, len(masks), len(self.chunks[own_shard]))
        where = self.chunks[own_shard][message.chunk]
        values = self.codec.decode(
            message.body, expected_numel=where.stop - where.start, expected_dtype=self.flat.dtype
        )
        self.out[where] = values
        masks.append(message.contributors)
        self.totals.setdefault(peer, []).append(message.weight)

    async def _reduce(self) -> None:
        """Average this member's shard chunk by chunk, each once its parts came (or at the reduce deadline),
        sending every mean to everyone at once: later chunks still travel while earlier ones come back."""
        for chunk in range(len(self.my_chunks)):
            await self._wait_until(functools.partial(self._chunk_complete, chunk), self.reduce_deadline)
            if not self._chunk_complete(chunk):
                for peer in self.others:
                    sent = len(self.parts.get(peer, ()))
                    if sent <= chunk and peer not in self.excluded:
                        detail = (
                            f"{sent} of {len(self.my_chunks)} PART chunks within "
                            f"reduce_timeout_s={self.settings.reduce_timeout_s}"
                        )
                        self._exclude(peer, Cause.MISSED_REDUCE_DEADLINE, detail)
            self._reduce_chunk(chunk)

    def _chunk_complete(self, chunk: int) -> bool:
        return all(len(self.parts.get(peer, ())) > chunk or peer in self.excluded for peer in self.others)

    def _reduce_chunk(self, chunk: int) -> None:
        where = self.my_chunks[chunk]
        parts = {member: self._part(member, chunk) for member in self.partition.members}
        order = [member for member, part in parts.items() if part is not None]
        values = [parts[member] for member in order]
        for received in self.parts.values():
            if len(received) > chunk:
                received[chunk] = None  # reduced: its memory can go
        weights = [self.weights[member] for member in order]
        total = sum(weights)
        divisor = total if total > 0 else float(len(order))  # all weights 0: a plain mean of what came
        scales = weights if total > 0 else [1.0] * len(order)
        mask = sum(1 << self.partition.index(member) for member in order)
        message = encode_message(
            KIND_RESULT,
            shard=self.index,
            chunk=chunk,
            tag=self.tag,
            weight=total,
            contributors=mask,
            codec=self.codec,
            values=weighted_mean(values, scales, divisor),
        )
        # Decode our own bytes so every member holds the very same values for this shard.
        body = message[MESSAGE_HEADER.size :]
        self.out[where] = self.codec.decode(
            body, expected_numel=where.stop - where.start, expected_dtype=self.flat.dtype
        )
        self.masks.setdefault(self.me, []).append(mask)
        self.totals.setdefault(self.me, []).append(total)
        for peer in self.others:
            if peer not in self.cut:
                self._enqueue(peer, lambda: message)

    def _part(self, member: str, chunk: int) -> torch.Tensor | None:
        """``member``'s values for one chunk of our shard, if it delivered them and they count."""
        if member == self.me:
            return self.flat[self.my_chunks[chunk]]
        received = self.parts.get(member, [])
        return received[chunk] if len(received) > chunk and member not in self.dropped else None

    def _gather_complete(self) -> bool:
        results_in = all(not self._results_missing(peer) or peer in self.cut for peer in self.reducers)
        return results_in and all(self.unsent[peer] == 0 or peer in self.cut for peer in self.others)

    async def _wait_until(self, condition: Callable[[], bool], deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return

    def _cut(self, peer: str, cause: Cause, detail: str) -> None:
        """Stop talking to ``peer``; its chunks not yet averaged are dropped unless only the link failed."""
        self.cut.add(peer)
        if cause is Cause.BAD_MESSAGE:
            self.dropped.add(peer)
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
        members = self.partition.members
        kept_local = tuple(peer for peer in self.reducers if self._results_missing(peer))
        for peer in kept_local:
            detail = "no RESULT within reduce_timeout_s + gather_timeout_s; kept local values for its shard"
            self._exclude(peer, Cause.MISSED_GATHER_DEADLINE, detail)
        out = self.out
        averaged = 0
        contributors: dict[str, tuple[str, ...]] = {}
        for index, member in enumerate(members):
            chunks, masks = self.chunks[index], self.masks.get(member, [])
            for where in chunks[len(masks) :]:
                out[where] = self.flat[where]  # kept local
            averaged += sum(where.stop - where.start for where in chunks[: len(masks)])
            if masks:
                common = functools.reduce(operator.and_, masks)  # whose parts are in every chunk we got
                contributors[member] = tuple(peer for i, peer in enumerate(members) if common >> i & 1)
        numel = self.flat.numel()
        report = RoundReport(
            round_id=self.round_id,
            me=self.me,
            partition=self.partition,
            contributors=contributors,
            total_weight={reducer: min(totals) for reducer, totals in self.totals.items()},
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
