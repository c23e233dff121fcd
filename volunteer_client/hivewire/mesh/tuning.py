"""Tuned aiortc SCTP: every adjustment that makes the data channel fast, in one place, without forking aiortc.

Untuned, aiortc moves ~22 MB/s at 100% of a core: ~45 µs of Python per 1,189-byte packet, one SACK per DATA
packet, an O(in-flight) scan on every transmit and a burst limit that collapses the window once SACKs are
delayed (shared/notes/webrtc-field-notes.md, "How far aiortc goes when tuned"). This module changes, for the
peer connections created while it is active:

1. ``_transmit`` scans the sent queue for chunks to retransmit only after an event that can mark one (a SACK
   reporting gaps, a T3 expiry), not on every call. Retransmission itself is unchanged.
2. The burst limit allows ``MAX_BURST_PACKETS`` new packets per transmit instead of 4, so a SACK that
   acknowledges several packets refills the window; fast recovery keeps aiortc's 2. New data also stays
   within the peer's advertised receive window (RFC 9260 6.1 A), which aiortc ignores.
3. Delayed SACK, towards a tuned peer: a SACK every ``SACK_EVERY_PACKETS`` DATA chunks or ``SACK_DELAY_S``
   after the first unacknowledged one, and at once on a gap, a duplicate or a FORWARD TSN.
4. Advertised receive window ``RECEIVE_WINDOW_BYTES`` (8 MiB) and, towards a tuned peer, initial congestion
   window ``INITIAL_CWND_BYTES`` (1 MiB).
5. UDP receive buffer of ICE and TURN sockets ``UDP_RECEIVE_BUFFER_BYTES`` (4 MiB; aioice asks 256 KiB).
6. Reassembly looks for complete messages only when a chunk can complete one (a message's last fragment,
   or one that fills a gap); aiortc rescans the stream's fragments on every chunk, ~20 µs a packet for
   262,144-byte messages.
7. Loss recovery (issue 8): a SACK reports at most ``SACK_MAX_ENTRIES`` gap blocks and duplicates, so it fits
   the 1,500 bytes aiortc's DTLS carries (aiortc's grows without bound and, once cut, is lost every time:
   the link went silent); a chunk is fast retransmitted once; T3 expiry spares gap-acknowledged chunks; the
   cumulative TSN advances in O(1) per chunk and in serial order across the 2**32 wrap.
8. Batched sends (Linux UDP GSO): the datagrams of one transmit burst over a plain UDP ICE pair go to the
   kernel in one ``sendmsg`` with ``UDP_SEGMENT`` per run of equal-sized datagrams (up to
   ``GSO_MAX_SEGMENTS``), instead of one ``sendto`` each: ~8 µs of syscall per datagram fell to ~1.3 µs on
   this machine. The kernel cuts them into the very same datagrams, so the peer sees no difference. TURN
   relays, a transport with data still buffered, or a kernel that refuses GSO (then off for the process,
   with a warning) take aioice's per-datagram path.
9. Control messages first: a message on the Link's control channel goes ahead of the bulk messages still
   queued for the association (behind other control messages, in their order). Credit for bulk payloads
   (``bulk_release``) and round coordination travel there; behind up to a MiB of queued bulk data they
   arrived an RTT plus the queue's drain late, which capped a 40 ms path at a few MB/s once payloads got
   small. Streams are independent in SCTP, so only the sender's order changes.

A peer is tuned when its INIT announces a receive window of at least ``RECEIVE_WINDOW_BYTES`` (aiortc
announces 1 MiB, browsers less than 8 MiB). Towards any other peer, SACKs go out per packet and the initial
window is aiortc's: an untuned aiortc sender adds only 4 packets per SACK, so SACKs every 8 packets would
shrink its flight to a few packets per timer tick, and a 1 MiB burst overflows an untuned receiver's 256 KiB
socket buffer (aiortc's loss recovery then costs O(in-flight) per SACK on both sides).

And :func:`run` / :func:`new_event_loop` give the network process uvloop, the largest single gain.

On the wire only timing and the announced window change: packet size stays aiortc's internet-safe 1,189 bytes,
and tuned and untuned peers (and browsers) interoperate. The SCTP changes apply per transport instance: a
subclass of ``RTCSctpTransport`` is what ``RTCPeerConnection`` constructs while tuning is active. The code
was written against aiortc ``TUNED_AIORTC_VERSION``; any other version leaves aiortc untouched with a
warning. ``HIVEWIRE_SCTP_TUNING=off`` (or ``apply_sctp_tuning(False)``) turns it all off.
"""

import asyncio
import errno
import logging
import os
import socket
import struct
import sys
import time
import weakref
from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

import aioice.ice
import aioice.turn
import aiortc
import aiortc.rtcpeerconnection
import aiortc.rtcsctptransport
from aiortc import RTCDataChannel
from aiortc.rtcsctptransport import (
    SCTP_COMMON_HEADER_LENGTH,
    SCTP_DATA_LAST_FRAG,
    SCTP_MAX_PACKET_LENGTH,
    DataChunk,
    ForwardTsnChunk,
    RTCSctpTransport,
    SackChunk,
    tsn_plus_one,
    uint32_gt,
)

from hivewire.mesh.link import CONTROL_CHANNEL_LABEL

logger = logging.getLogger(__name__)

TUNED_AIORTC_VERSION = "1.16.0"
ENV_SWITCH = "HIVEWIRE_SCTP_TUNING"
_OFF_VALUES = frozenset({"off", "0", "false", "no"})
_ON_VALUES = frozenset({"", "on", "1", "true", "yes"})

# A chunk's miss count once it has been fast retransmitted: aiortc's strike counter never climbs back to 3 from
# here, so the chunk is fast retransmitted once (RFC 9260 7.2.4) and a lost retransmission waits for T3.
_FAST_RETRANSMITTED = -(2**62)
MAX_BURST_PACKETS = 32  # new packets per transmit call; aiortc allows flight + 4
FAST_RECOVERY_BURST_PACKETS = 2  # as aiortc: during fast recovery the window must shrink
SACK_EVERY_PACKETS = 8  # DATA chunks acknowledged per SACK when packets arrive back to back
SACK_DELAY_S = 0.002  # longest a SACK waits for more packets; far below the 1 s minimum RTO
INITIAL_CWND_BYTES = 1 * 2**20  # towards a tuned peer; others get aiortc's initial window
RECEIVE_WINDOW_BYTES = 8 * 2**20
# Data in flight at most, whatever the windows say: below the peer's UDP receive buffer (4 MiB asked), which
# otherwise overflows while the 8 MiB window fills, and the flight then crawls through loss recovery. Measured
# on loopback, 32 MiB, two processes: 8 MiB of flight gave 5.5-20.6 MB/s from run to run, 2 MiB 26-30 MB/s.
MAX_FLIGHT_BYTES = 2 * 2**20
UDP_RECEIVE_BUFFER_BYTES = 4 * 2**20
# Gap blocks and duplicate TSNs (4 bytes each) that fit one SACK packet. aiortc's DTLS moves at most 1,500 bytes
# per datagram each way (bio_read(1500), recv(1500)): a longer SACK arrives cut and is dropped, every time.
_SACK_CHUNK_HEADER_LENGTH = 16
SACK_MAX_ENTRIES = (SCTP_MAX_PACKET_LENGTH - SCTP_COMMON_HEADER_LENGTH - _SACK_CHUNK_HEADER_LENGTH) // 4

# What the tuning replaces or relies on; a missing one means this aiortc is not the one it was written for.
_SCTP_METHODS = (
    "_transmit",
    "_data_channel_send",
    "_send_sack",
    "_send_chunk",
    "_receive_data_chunk",
    "_mark_received",
    "_get_inbound_stream",
    "_reset_deferred_streams",
    "_receive",
    "_receive_forward_tsn_chunk",
    "_receive_sack_chunk",
    "_t3_expired",
    "_t3_restart",
    "_t3_start",
    "_set_state",
    "_flight_size_increase",
)
_MODULE_ATTRIBUTES = (
    (aioice.ice, "StunProtocol"),
    (aioice.turn, "TurnTransport"),
    (aiortc.rtcpeerconnection, "RTCSctpTransport"),
    (aiortc.rtcsctptransport, "USERDATA_MAX_LENGTH"),
    (aioice.turn, "UDP_SOCKET_BUFFER_SIZE"),
)

_T = TypeVar("_T")

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # Linux's option number; Python 3.11 does not name it
GSO_MAX_SEGMENTS = 32  # datagrams per sendmsg: a whole burst, within every kernel's limit (64)
GSO_MAX_BYTES = 60_000  # and the UDP length limit of the datagram the kernel then cuts
# errno of a kernel or socket that cannot segment: GSO goes off for the process; others fall back per batch.
_GSO_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EIO})


class _DatagramBatch:
    """The datagrams one SCTP transmit burst hands a UDP ICE pair, sent with as few syscalls as the kernel allows.

    While a batch is open, the pair's ``StunProtocol.send_data`` (aioice sends every DTLS record through it)
    collects instead of sending; ``flush`` sends what it collected, in order, and closes the batch.
    """

    gso_working: ClassVar[bool] = sys.platform.startswith("linux")  # off for the process once a kernel refuses
    sockets: ClassVar["weakref.WeakKeyDictionary[Any, socket.socket]"] = weakref.WeakKeyDictionary()  # a dup each
    stats: ClassVar[dict[str, int]] = {"sendmsg": 0, "datagrams": 0}  # GSO sends and the datagrams they carried

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.datagrams: list[tuple[bytes, Any]] = []

    @classmethod
    def open(cls, sctp: RTCSctpTransport) -> "_DatagramBatch | None":
        """A batch on the association's active pair, or None (not a plain UDP pair, GSO off, already open)."""
        if not cls.gso_working:
            return None
        try:
            pair = sctp.transport.transport._connection._nominated.get(1)
        except AttributeError:
            return None
        protocol = getattr(pair, "protocol", None)
        if type(protocol) is not aioice.ice.StunProtocol or "send_data" in vars(protocol):
            return None  # TCP, or a batch is open already (its owner flushes)
        if isinstance(getattr(protocol, "transport", None), aioice.turn.TurnTransport):
            return None  # relayed: each datagram must go through the TURN client's framing
        batch = cls(protocol)

        async def collect(data: bytes, addr: Any) -> None:
            batch.datagrams.append((data, addr))

        protocol.send_data = collect
        return batch

    def flush(self) -> None:
        del self.protocol.send_data  # aioice's own method again
        datagrams, transport = self.datagrams, self.protocol.transport
        if transport is None or transport.is_closing():
            sock = self.sockets.pop(self.protocol, None)
            if sock is not None:
                sock.close()
            return
        if transport.get_write_buffer_size() or len(datagrams) < 2:  # keep order behind what is buffered
            for data, addr in datagrams:
                transport.sendto(data, addr)
            return
        sock = self._socket(transport)
        start = 0
        while start < len(datagrams):
            stop = self._run_end(datagrams, start)
            if sock is None or stop - start == 1 or not self._send_segmented(sock, datagrams[start:stop]):
                for data, addr in datagrams[start:]:  # the rest one by one, as aioice would have
                    transport.sendto(data, addr)
                return
            start = stop

    @staticmethod
    def _run_end(datagrams: list[tuple[bytes, Any]], start: int) -> int:
        """End of the run from ``start`` that one segmented send can carry: one address, equal sizes but
        possibly a shorter last one, within the segment and byte limits."""
        size, addr = len(datagrams[start][0]), datagrams[start][1]
        stop, total = start + 1, size
        while stop < len(datagrams) and stop - start < GSO_MAX_SEGMENTS:
            data, to = datagrams[stop]
            if to != addr or len(data) > size or total + len(data) > GSO_MAX_BYTES:
                break
            stop, total = stop + 1, total + len(data)
            if len(data) < size:
                break  # only the last segment may be shorter
        return stop

    def _socket(self, transport: Any) -> socket.socket | None:
        sock = self.sockets.get(self.protocol)
        if sock is None:
            raw = transport.get_extra_info("socket")
            if raw is None:
                return None
            sock = socket.socket(raw.family, raw.type, fileno=os.dup(raw.fileno()))
            sock.setblocking(False)
            self.sockets[self.protocol] = sock
            weakref.finalize(self.protocol, sock.close)
        return sock

    def _send_segmented(self, sock: socket.socket, run: list[tuple[bytes, Any]]) -> bool:
        """One sendmsg for the run; False when the caller must send it (and what follows) one by one."""
        segment = struct.pack("=H", len(run[0][0]))
        try:
            _sendmsg(sock, [data for data, _ in run], [(socket.IPPROTO_UDP, UDP_SEGMENT, segment)], run[0][1])
        except BlockingIOError:
            return False  # socket buffer full: the transport queues the rest and waits for room
        except OSError as exc:
            if exc.errno in _GSO_UNSUPPORTED:
                type(self).gso_working = False
                logger.warning("UDP GSO refused (%s): data channels send one datagram per syscall", exc)
            return False
        self.stats["sendmsg"] += 1
        self.stats["datagrams"] += len(run)
        return True


def _sendmsg(sock: socket.socket, buffers: list[bytes], ancillary: list[tuple[int, int, bytes]], addr: Any) -> int:
    return sock.sendmsg(buffers, ancillary, 0, addr)


class TunedSctpTransport(RTCSctpTransport):
    """aiortc's SCTP transport with the changes listed in the module docstring; same wire format."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._standard_cwnd = self._cwnd  # aiortc's initial window, for an untuned peer
        self._cwnd = INITIAL_CWND_BYTES  # lowered at ESTABLISHED unless the peer is tuned
        self._advertised_rwnd = RECEIVE_WINDOW_BYTES
        self._peer_rwnd: int | None = None  # a_rwnd of the peer's latest SACK; unknown until the first one
        self._retransmit_possible = False  # set by the events that can mark a chunk for retransmission
        self._t3_marked: set[int] = set()  # TSNs the latest T3 expiry marked: these may be fast retransmitted again
        self._unacked_packets = 0  # DATA chunks received since our last SACK
        self._sack_now = False  # something arrived that the peer must hear about without delay
        self._peer_tuned = False  # known at ESTABLISHED, from the window the peer's INIT announced
        self._sack_timer: asyncio.TimerHandle | None = None
        self._sack_tasks: set[asyncio.Task[None]] = set()

    # --- sender ------------------------------------------------------------------------------------------

    async def _receive_sack_chunk(self, chunk: SackChunk) -> None:
        if not uint32_gt(self._last_sacked_tsn, chunk.cumulative_tsn):  # aiortc ignores stale SACKs too
            self._peer_rwnd = chunk.advertised_rwnd
            if chunk.gaps:  # only gap reports strike chunks for fast retransmission
                self._retransmit_possible = True
        await super()._receive_sack_chunk(chunk)

    def _t3_expired(self) -> None:
        """aiortc's T3 expiry (cwnd to one packet, everything outstanding marked), sparing gap-acknowledged chunks.

        A gap-acknowledged chunk is not outstanding (RFC 9260 1.3; Linux spares it too). aiortc resends it, so
        the one-packet window refills with duplicates, which acknowledge nothing new: the chunks really lost
        collect no miss indications and each waits for the next T3 expiry, about ten chunks a second.
        """
        self._retransmit_possible = True
        super()._t3_expired()
        self._t3_marked = set()
        for chunk in self._sent_queue:
            if chunk._acked:
                chunk._retransmit = False
            elif chunk._retransmit:
                self._t3_marked.add(chunk.tsn)

    async def _transmit(self) -> None:
        """aiortc's _transmit without the per-call retransmit scan and with a burst limit that keeps the window;
        the burst's datagrams leave in batches (_DatagramBatch)."""
        batch = _DatagramBatch.open(self)
        try:
            await self._transmit_burst()
        finally:
            if batch is not None:
                batch.flush()

    async def _transmit_burst(self) -> None:
        if self._forward_tsn_chunk is not None:
            await self._send_chunk(self._forward_tsn_chunk)
            self._forward_tsn_chunk = None
            if not self._t3_handle:
                self._t3_start()

        mtu = aiortc.rtcsctptransport.USERDATA_MAX_LENGTH
        burst = FAST_RECOVERY_BURST_PACKETS if self._fast_recovery_exit is not None else MAX_BURST_PACKETS
        cwnd = min(self._flight_size + burst * mtu, self._cwnd, MAX_FLIGHT_BYTES)

        if self._retransmit_possible:
            self._retransmit_possible = False  # cleared first: an event during a send may set it again
            retransmit_earliest = True
            for chunk in self._sent_queue:
                if chunk._retransmit:
                    if self._fast_recovery_transmit:
                        self._fast_recovery_transmit = False
                    elif self._flight_size >= cwnd:
                        self._retransmit_possible = True  # what is left goes out on the next SACK
                        return
                    self._flight_size_increase(chunk)
                    # aiortc resets the count and strikes the copy again on the next three SACKs that were on
                    # their way before it arrived: dozens of copies per lost chunk, which overflow the peer.
                    chunk._misses = 0 if chunk.tsn in self._t3_marked else _FAST_RETRANSMITTED
                    self._t3_marked.discard(chunk.tsn)
                    chunk._retransmit = False
                    chunk._sent_count += 1
                    await self._send_chunk(chunk)
                    if retransmit_earliest:
                        self._t3_restart()
                retransmit_earliest = False

        # The peer's window bounds new data (one chunk may probe a closed window when nothing is in flight).
        if self._peer_rwnd is not None and self._flight_size > 0:
            cwnd = min(cwnd, self._peer_rwnd)
        now = time.time()  # the clock aiortc's RTO estimate reads; once per call, not per chunk
        while self._outbound_queue and self._flight_size < cwnd:
            chunk = self._outbound_queue.popleft()
            self._sent_queue.append(chunk)
            self._flight_size_increase(chunk)
            chunk._sent_count += 1
            chunk._sent_time = now
            await self._send_chunk(chunk)
            if not self._t3_handle:
                self._t3_start()

    def _data_channel_send(self, channel: RTCDataChannel, data: bytes | str) -> None:
        """aiortc's, with control-channel messages queued ahead of every other channel's."""
        super()._data_channel_send(channel, data)
        queue = self._data_channel_queue
        if channel.label != CONTROL_CHANNEL_LABEL or len(queue) < 2:
            return
        entry = queue.pop()
        ahead = 0  # control messages already at the front keep their order
        while ahead < len(queue) and queue[ahead][0].label == CONTROL_CHANNEL_LABEL:
            ahead += 1
        queue.insert(ahead, entry)

    # --- receiver ----------------------------------------------------------------------------------------

    async def _receive_data_chunk(self, chunk: DataChunk) -> None:
        """aiortc's _receive_data_chunk, minus the reassembly scan for chunks that cannot complete a message."""
        self._unacked_packets += 1
        self._sack_needed = True
        if self._mark_received(chunk.tsn):
            return
        stream = self._get_inbound_stream(chunk.stream_id)
        # A chunk above every chunk held, and not a message's last, completes nothing: whatever was
        # deliverable was delivered when it arrived. aiortc rescans the stream anyway, O(fragments) per chunk.
        completes_nothing = not chunk.flags & SCTP_DATA_LAST_FRAG and (
            not stream.reassembly or uint32_gt(chunk.tsn, stream.reassembly[-1].tsn)
        )
        stream.add_chunk(chunk)
        self._advertised_rwnd -= len(chunk.user_data)
        if not completes_nothing:
            for message in stream.pop_messages():
                self._advertised_rwnd += len(message[2])
                await self._receive(*message)
        await self._reset_deferred_streams()

    def _mark_received(self, tsn: int) -> bool:
        """aiortc's _mark_received (True for a duplicate), in TSN order across the wrap and O(1) per chunk.

        aiortc sorts the out-of-order TSNs numerically on every chunk: O(gaps log gaps) per packet while a loss
        is repaired, and across the 2**32 wrap 0 sorts before 2**32 - 1, so the cumulative TSN stops short.
        """
        if not uint32_gt(tsn, self._last_received_tsn) or tsn in self._sack_misordered:
            self._sack_duplicates.append(tsn)
            return True
        self._sack_misordered.add(tsn)
        following = tsn_plus_one(self._last_received_tsn)
        while following in self._sack_misordered:
            self._sack_misordered.remove(following)
            self._last_received_tsn = following
            following = tsn_plus_one(following)
        if self._sack_duplicates:
            self._sack_duplicates = [x for x in self._sack_duplicates if uint32_gt(x, self._last_received_tsn)]
        return False

    async def _receive_forward_tsn_chunk(self, chunk: ForwardTsnChunk) -> None:
        self._sack_now = True
        await super()._receive_forward_tsn_chunk(chunk)

    async def _send_sack(self) -> None:
        """Send now when due; otherwise leave ``_sack_needed`` set and let the timer send it."""
        due = (
            not self._peer_tuned  # an untuned sender needs a SACK per packet to keep its window open
            or self._sack_now
            or self._unacked_packets >= SACK_EVERY_PACKETS
            or self._sack_misordered  # a gap: the sender needs it for fast retransmit
            or self._sack_duplicates  # our earlier SACK may have been lost
            or self._advertised_rwnd < RECEIVE_WINDOW_BYTES // 2
            or self._association_state != self.State.ESTABLISHED
        )
        if not due:
            if self._sack_timer is None:
                self._sack_timer = asyncio.get_running_loop().call_later(SACK_DELAY_S, self._sack_timer_expired)
            return
        self._cancel_sack_timer()
        self._unacked_packets = 0
        self._sack_now = False
        await self._send_bounded_sack()

    async def _send_bounded_sack(self) -> None:
        """aiortc's SACK, cut to one packet: the lowest ``SACK_MAX_ENTRIES`` gap blocks, then duplicates that fit.

        aiortc reports every gap block and duplicate, so after a burst of losses its SACK outgrows the 1,500
        bytes its DTLS carries and is lost each time it is sent: the sender hears nothing, retransmits one chunk
        per T3 expiry and the association goes silent (issue 8). Reporting fewer blocks is what RFC 9260 6.2
        asks of a SACK larger than the path MTU; the lowest gaps come first because they are the chunks the
        sender must retransmit first (in TSN order: aiortc sorts numerically, wrong across the 2**32 wrap).
        Duplicates are informational and go last.
        """
        gaps: list[list[int]] = []
        gap_next = None
        for tsn in sorted(self._sack_misordered, key=lambda tsn: (tsn - self._last_received_tsn) % 2**32):
            pos = (tsn - self._last_received_tsn) % 2**32
            if tsn == gap_next:
                gaps[-1][1] = pos
            elif len(gaps) == SACK_MAX_ENTRIES:
                break
            else:
                gaps.append([pos, pos])
            gap_next = tsn_plus_one(tsn)
        sack = SackChunk()
        sack.cumulative_tsn = self._last_received_tsn
        sack.advertised_rwnd = max(0, self._advertised_rwnd)
        sack.gaps = [(start, end) for start, end in gaps]
        sack.duplicates = self._sack_duplicates[: SACK_MAX_ENTRIES - len(gaps)]
        if len(sack.duplicates) < len(self._sack_duplicates) or len(gaps) == SACK_MAX_ENTRIES:
            logger.debug(
                "SACK cut to one packet: %d gap blocks, %d of %d duplicates",
                len(gaps),
                len(sack.duplicates),
                len(self._sack_duplicates),
            )
        await self._send_chunk(sack)
        self._sack_duplicates.clear()
        self._sack_needed = False

    def _sack_timer_expired(self) -> None:
        self._sack_timer = None
        task = asyncio.get_running_loop().create_task(self._send_delayed_sack())
        self._sack_tasks.add(task)
        task.add_done_callback(self._sack_tasks.discard)

    async def _send_delayed_sack(self) -> None:
        if not self._sack_needed or self._association_state == self.State.CLOSED:
            return
        self._sack_now = True
        try:
            await self._send_sack()
        except ConnectionError as exc:  # DTLS closed under us: the association is going away anyway
            logger.debug("delayed SACK not sent: %s", exc)

    def _cancel_sack_timer(self) -> None:
        if self._sack_timer is not None:
            self._sack_timer.cancel()
            self._sack_timer = None

    def _set_state(self, state: RTCSctpTransport.State) -> None:
        if state == self.State.ESTABLISHED and self._association_state != state:
            peer_window = getattr(self, "_ssthresh", 0)  # aiortc keeps the peer's INIT a_rwnd as ssthresh
            self._peer_tuned = peer_window >= RECEIVE_WINDOW_BYTES
            if not self._peer_tuned:
                self._cwnd = self._standard_cwnd
            logger.debug("SCTP peer announces a %d-byte window: tuned peer %s", peer_window, self._peer_tuned)
        elif state == self.State.CLOSED:
            self._cancel_sack_timer()
        super()._set_state(state)


_saved: dict[str, Any] = {}  # what apply_sctp_tuning replaced, while tuning is active


def _switched_off_by_environment() -> bool:
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value in _OFF_VALUES:
        return True
    if value not in _ON_VALUES:
        logger.warning("%s=%r is neither on nor off; SCTP tuning stays on", ENV_SWITCH, value)
    return False


def _incompatibility() -> str | None:
    """Why this aiortc cannot be tuned safely, or None when it can."""
    installed = getattr(aiortc, "__version__", "unknown")
    if installed != TUNED_AIORTC_VERSION:
        return f"aiortc {installed} is installed, the tuning was written for {TUNED_AIORTC_VERSION}"
    missing = [name for name in _SCTP_METHODS if not callable(getattr(RTCSctpTransport, name, None))]
    missing += [f"{module.__name__}.{name}" for module, name in _MODULE_ATTRIBUTES if not hasattr(module, name)]
    if missing:
        return f"aiortc {installed} lacks {', '.join(missing)}"
    return None


def _receive_buffer_accepted() -> bool:
    """Whether this OS takes a UDP receive buffer of UDP_RECEIVE_BUFFER_BYTES (aioice drops a socket that fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER_BYTES)
        except OSError as exc:
            logger.warning(
                "UDP receive buffer of %d bytes refused (%s); keeping aioice's", UDP_RECEIVE_BUFFER_BYTES, exc
            )
            return False
        granted = probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if sys.platform.startswith("linux"):
        granted //= 2  # Linux reports twice what it grants (the other half is its bookkeeping)
    if granted < UDP_RECEIVE_BUFFER_BYTES:
        logger.warning(
            "UDP receive buffer capped at %d bytes (asked %d); datagrams may drop at full speed. On Linux raise "
            "the cap with: sysctl -w net.core.rmem_max=%d",
            granted,
            UDP_RECEIVE_BUFFER_BYTES,
            UDP_RECEIVE_BUFFER_BYTES,
        )
    return True


def apply_sctp_tuning(enabled: bool = True) -> bool:
    """Make peer connections created from now on use the tuned SCTP transport; True when tuning is active.

    Idempotent. ``enabled=False``, ``HIVEWIRE_SCTP_TUNING=off`` or an aiortc other than
    ``TUNED_AIORTC_VERSION`` leave (or put) aiortc untouched and return False. Connections that exist keep
    the transport they were built with.
    """
    if not enabled or _switched_off_by_environment():
        if sctp_tuning_active():
            remove_sctp_tuning()
        logger.info("SCTP tuning off (%s)", "disabled by setting" if not enabled else f"{ENV_SWITCH}=off")
        return False
    if sctp_tuning_active():
        return True
    problem = _incompatibility()
    if problem is not None:
        logger.warning("SCTP tuning off: %s; data channels run at aiortc's default speed", problem)
        return False
    _saved["RTCSctpTransport"] = aiortc.rtcpeerconnection.RTCSctpTransport
    aiortc.rtcpeerconnection.RTCSctpTransport = TunedSctpTransport  # type: ignore[misc]
    if _receive_buffer_accepted():
        _saved["UDP_SOCKET_BUFFER_SIZE"] = aioice.turn.UDP_SOCKET_BUFFER_SIZE
        aioice.turn.UDP_SOCKET_BUFFER_SIZE = UDP_RECEIVE_BUFFER_BYTES
    logger.info(
        "SCTP tuning on for aiortc %s: burst %d packets, SACK every %d packets, cwnd %d KiB, rwnd %d KiB, "
        "UDP receive buffer %d KiB",
        TUNED_AIORTC_VERSION,
        MAX_BURST_PACKETS,
        SACK_EVERY_PACKETS,
        INITIAL_CWND_BYTES // 1024,
        RECEIVE_WINDOW_BYTES // 1024,
        aioice.turn.UDP_SOCKET_BUFFER_SIZE // 1024,
    )
    return True


def remove_sctp_tuning() -> None:
    """Put back exactly what apply_sctp_tuning replaced; a no-op when tuning is not active."""
    if "RTCSctpTransport" in _saved:
        aiortc.rtcpeerconnection.RTCSctpTransport = _saved.pop("RTCSctpTransport")  # type: ignore[misc]
    if "UDP_SOCKET_BUFFER_SIZE" in _saved:
        aioice.turn.UDP_SOCKET_BUFFER_SIZE = _saved.pop("UDP_SOCKET_BUFFER_SIZE")


def sctp_tuning_active() -> bool:
    """Whether peer connections created now get the tuned SCTP transport."""
    return aiortc.rtcpeerconnection.RTCSctpTransport is TunedSctpTransport


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop where uvloop is installed (it nearly doubles aiortc's throughput), else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(coro)`` on :func:`new_event_loop`; what the network process runs its main coroutine with."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)
