"""The tuned aiortc SCTP path (hivewire.mesh.tuning) proves: it refuses an aiortc it was not written for and
can be switched off, leaving aiortc exactly as it was; lost DATA packets are still retransmitted (fast
retransmit and T3) and payloads arrive bit-exact; reassembly delivers exactly what aiortc's delivers, for
reordered and duplicated chunks; delayed SACKs still acknowledge the last packet and are fewer than the
packets they acknowledge; ICE sockets get the larger receive buffer (and a capped one is reported); and a
tuned peer and an untuned one exchange payloads both ways over hivewire Links.

Tuning applies per transport instance (RTCPeerConnection builds the tuned subclass while it is active), so
one process can hold a tuned and an untuned peer. Everything runs on 127.0.0.1 (conftest.py).
"""

import asyncio
import errno
import hashlib
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import aioice.ice
import aioice.turn
import aiortc
import aiortc.rtcpeerconnection
import pytest
from aiortc import RTCPeerConnection
from aiortc.rtcsctptransport import (
    SCTP_COMMON_HEADER_LENGTH,
    SCTP_DATA_FIRST_FRAG,
    SCTP_DATA_LAST_FRAG,
    SCTP_DATA_UNORDERED,
    SCTP_MAX_PACKET_LENGTH,
    DataChunk,
    RTCSctpTransport,
    SackChunk,
    tsn_minus_one,
)

from hivewire.mesh import Link, LinkSettings, tuning
from hivewire.mesh.tuning import (
    ENV_SWITCH,
    SACK_MAX_ENTRIES,
    TUNED_AIORTC_VERSION,
    UDP_RECEIVE_BUFFER_BYTES,
    TunedSctpTransport,
    apply_sctp_tuning,
    remove_sctp_tuning,
    sctp_tuning_active,
)

from .conftest import negotiate, new_pc

DEADLINE_S = 30  # bound on any transfer here, so a stuck association fails the test instead of hanging it
QUICK = LinkSettings(open_timeout_s=10)  # keepalives every 5 s: none lands inside a test's packet counts
DATA, SACK = 0, 3  # SCTP chunk types; aiortc puts one chunk in each packet, right after the 12-byte header


@pytest.fixture(autouse=True)
def _untuned_around_each_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts and ends with aiortc untouched, whatever the environment says."""
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    remove_sctp_tuning()
    yield
    remove_sctp_tuning()


def aiortc_state() -> tuple[object, int, dict[str, object]]:
    """Everything the tuning could touch: the class RTCPeerConnection builds, aioice's buffer size, the base class."""
    return aiortc.rtcpeerconnection.RTCSctpTransport, aioice.turn.UDP_SOCKET_BUFFER_SIZE, dict(vars(RTCSctpTransport))


# --- switches ----------------------------------------------------------------------------------------------


def test_apply_is_idempotent_and_remove_restores_aiortc_exactly() -> None:
    before = aiortc_state()
    assert apply_sctp_tuning() is True
    assert sctp_tuning_active()
    assert aiortc.rtcpeerconnection.RTCSctpTransport is TunedSctpTransport
    assert aioice.turn.UDP_SOCKET_BUFFER_SIZE == UDP_RECEIVE_BUFFER_BYTES
    assert dict(vars(RTCSctpTransport)) == before[2], "the tuning must subclass, never patch aiortc's class"
    assert apply_sctp_tuning() is True  # a second call changes nothing and forgets no original
    remove_sctp_tuning()
    assert aiortc_state() == before
    assert not sctp_tuning_active()
    remove_sctp_tuning()  # a no-op when off
    assert aiortc_state() == before


def test_another_aiortc_version_leaves_aiortc_untouched_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(aiortc, "__version__", "1.17.0")
    before = aiortc_state()
    with caplog.at_level(logging.WARNING, logger=tuning.__name__):
        assert apply_sctp_tuning() is False
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "1.17.0" in warnings[0].getMessage() and TUNED_AIORTC_VERSION in warnings[0].getMessage()
    assert aiortc_state() == before
    assert not sctp_tuning_active()


def test_a_missing_internal_leaves_aiortc_untouched(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(RTCSctpTransport, "_send_sack")
    before = aiortc_state()
    with caplog.at_level(logging.WARNING, logger=tuning.__name__):
        assert apply_sctp_tuning() is False
    assert [r.getMessage() for r in caplog.records if "_send_sack" in r.getMessage()], caplog.text
    assert aiortc_state() == before


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false", " no "])
def test_environment_switch_turns_tuning_off_and_back(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    before = aiortc_state()
    assert apply_sctp_tuning() is True
    monkeypatch.setenv(ENV_SWITCH, value)
    assert apply_sctp_tuning() is False
    assert aiortc_state() == before
    monkeypatch.setenv(ENV_SWITCH, "on")
    assert apply_sctp_tuning() is True


def test_flag_switch_turns_tuning_off() -> None:
    before = aiortc_state()
    assert apply_sctp_tuning(enabled=False) is False
    assert aiortc_state() == before
    assert apply_sctp_tuning() is True
    assert apply_sctp_tuning(enabled=False) is False
    assert aiortc_state() == before


def test_a_capped_receive_buffer_is_reported_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rmem_max = Path("/proc/sys/net/core/rmem_max")
    if not rmem_max.exists():
        pytest.skip("the cap is Linux's net.core.rmem_max")
    too_big = 2 * int(rmem_max.read_text())
    monkeypatch.setattr(tuning, "UDP_RECEIVE_BUFFER_BYTES", too_big)
    with caplog.at_level(logging.WARNING, logger=tuning.__name__):
        assert apply_sctp_tuning() is True
    assert f"sysctl -w net.core.rmem_max={too_big}" in caplog.text


def test_run_uses_uvloop_where_installed() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert tuning.run(loop_type()) is uvloop.Loop


# --- reassembly --------------------------------------------------------------------------------------------


class _Dtls:
    """Just enough of an RTCDtlsTransport to construct an SCTP transport that is fed chunks directly."""

    state = "connected"
    _role = "client"


def _chunks(seed: int, first_tsn: int) -> list[DataChunk]:
    """Messages of 1 to 40 fragments on two ordered streams and one unordered, with consecutive TSNs."""
    chance = random.Random(seed)
    chunks, tsn, seqs = [], first_tsn, {1: 0, 3: 0, 5: 0}
    for _ in range(60):
        stream = chance.choice((1, 3, 5))
        fragments = chance.randint(1, 40)
        for index in range(fragments):
            chunk = DataChunk()
            chunk.flags = (SCTP_DATA_UNORDERED if stream == 5 else 0) | (SCTP_DATA_FIRST_FRAG if index == 0 else 0)
            chunk.flags |= SCTP_DATA_LAST_FRAG if index == fragments - 1 else 0
            chunk.tsn, chunk.stream_id, chunk.stream_seq, chunk.protocol = tsn, stream, seqs[stream] % 65536, 53
            chunk.user_data = os.urandom(chance.randint(1, 1172))
            chunks.append(chunk)
            tsn = (tsn + 1) % 2**32
        if stream != 5:  # unordered messages carry no stream sequence number
            seqs[stream] += 1
    return chunks


async def _deliver(kind: type[RTCSctpTransport], chunks: list[DataChunk], first_tsn: int) -> tuple[list, int]:
    """What an SCTP transport of ``kind`` hands to its data channels, in order, and the window it ends with."""
    sctp = kind(_Dtls())
    sctp._last_received_tsn = tsn_minus_one(first_tsn)
    start_window = sctp._advertised_rwnd
    delivered: list[tuple[int, int, bytes]] = []

    async def receive(stream_id: int, pp_id: int, data: bytes) -> None:
        delivered.append((stream_id, pp_id, data))

    sctp._receive = receive
    for chunk in chunks:
        await sctp._receive_data_chunk(chunk)
    return delivered, start_window - sctp._advertised_rwnd


@pytest.mark.parametrize("seed", range(4))
async def test_reassembly_delivers_exactly_what_aiortc_delivers(seed: int) -> None:
    """Chunks reordered (as by a network and by retransmission) and duplicated, across a TSN wrap."""
    first_tsn = 2**32 - 300
    chunks = _chunks(seed, first_tsn)
    chance = random.Random(seed)
    arriving = [chunk for chunk in chunks for _ in range(2 if chance.random() < 0.05 else 1)]
    for start in range(0, len(arriving), 50):  # local reordering within windows of 50 chunks
        window = arriving[start : start + 50]
        chance.shuffle(window)
        arriving[start : start + 50] = window
    expected, expected_held = await _deliver(RTCSctpTransport, arriving, first_tsn)
    delivered, held = await _deliver(TunedSctpTransport, arriving, first_tsn)
    assert len(expected) == 60
    assert delivered == expected
    assert held == expected_held == 0


# --- links -------------------------------------------------------------------------------------------------


@dataclass
class Wire:
    """Spies on what one peer's SCTP hands to DTLS; optionally drops DATA packets on their way out."""

    drop: Callable[[int, int], bool] = lambda tsn, times_sent: False
    sent: dict[int, int] = field(default_factory=dict)  # DATA TSN -> transmissions, drops included
    dropped: int = 0
    sacks: int = 0
    longest_sack: int = 0  # bytes of the longest SACK packet sent

    def install(self, pc: RTCPeerConnection) -> None:
        dtls = pc.sctp.transport
        send = dtls._send_data

        async def send_data(data: bytes) -> None:
            if len(data) >= 20 and data[12] == DATA:
                tsn = int.from_bytes(data[16:20], "big")  # after type, flags and length
                self.sent[tsn] = self.sent.get(tsn, 0) + 1
                if self.drop(tsn, self.sent[tsn]):
                    self.dropped += 1
                    return
            elif len(data) > 12 and data[12] == SACK:
                self.sacks += 1
                self.longest_sack = max(self.longest_sack, len(data))
            await send(data)

        dtls._send_data = send_data

    @property
    def retransmissions(self) -> int:
        return sum(count - 1 for count in self.sent.values())


@dataclass
class Pair:
    a: Link
    b: Link
    pc_a: RTCPeerConnection
    pc_b: RTCPeerConnection


async def open_pair(tuned_a: bool, tuned_b: bool) -> Pair:
    """Two open links; each side's SCTP transport is tuned or not as asked (tuning is per instance)."""
    pcs, links = [], []
    for tuned, peer in ((tuned_a, "b"), (tuned_b, "a")):
        apply_sctp_tuning(enabled=tuned)
        pcs.append(new_pc())
        links.append(Link(pcs[-1], peer=peer, settings=QUICK))  # creating its channels builds the SCTP transport
    remove_sctp_tuning()
    (pc_a, pc_b), (a, b) = pcs, links
    assert isinstance(pc_a.sctp, TunedSctpTransport) is tuned_a
    assert isinstance(pc_b.sctp, TunedSctpTransport) is tuned_b
    try:
        await negotiate(pc_a, pc_b)
        await asyncio.gather(a.wait_open(), b.wait_open())
    except BaseException:
        await asyncio.gather(a.close(), b.close())
        raise
    return Pair(a, b, pc_a, pc_b)


@pytest.fixture
async def pairs() -> AsyncIterator[Callable[[bool, bool], object]]:
    opened: list[Pair] = []

    async def make(tuned_a: bool, tuned_b: bool) -> Pair:
        pair = await open_pair(tuned_a, tuned_b)
        opened.append(pair)
        return pair

    yield make
    for pair in opened:
        await asyncio.gather(pair.a.close(), pair.b.close())


async def transfer(sender: Link, receiver: Link, data: bytes) -> None:
    """Send one payload and check that what arrives has the same SHA-256."""
    sending = asyncio.create_task(sender.send_payload(data))
    _, received = await asyncio.wait_for(receiver.recv_payload(), DEADLINE_S)
    await asyncio.wait_for(sending, DEADLINE_S)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(data).hexdigest()


async def acknowledged(pc: RTCPeerConnection) -> None:
    """Wait until every DATA chunk this side sent has been acknowledged."""
    async with asyncio.timeout(DEADLINE_S):
        sctp = pc.sctp
        while sctp._data_channel_queue or sctp._outbound_queue or sctp._sent_queue:  # noqa: ASYNC110 - no event
            await asyncio.sleep(0.01)


async def test_lost_data_packets_are_retransmitted_and_the_payload_arrives_bit_exact(pairs) -> None:
    pair = await pairs(True, True)
    chance = random.Random(8)  # fixed seed: the same packets are lost on every run
    wire = Wire(drop=lambda tsn, times_sent: times_sent == 1 and chance.random() < 0.03)
    wire.install(pair.pc_a)
    await transfer(pair.a, pair.b, os.urandom(3 * 2**20))
    assert wire.dropped > 20
    assert wire.retransmissions >= wire.dropped


async def test_a_lost_last_packet_is_retransmitted_when_t3_expires(pairs) -> None:
    """Nothing follows the lost packet, so no SACK reports a gap: only the T3 timer can recover it."""
    pair = await pairs(True, True)
    first_data = [True]

    def drop_first(tsn: int, times_sent: int) -> bool:
        if first_data[0]:
            first_data[0] = False
            return True
        return False

    await transfer(pair.a, pair.b, b"warm-up: gives the sender an RTT, so its RTO is the 1 s minimum, not 3 s")
    await acknowledged(pair.pc_a)
    wire = Wire(drop=drop_first)
    wire.install(pair.pc_a)
    await transfer(pair.a, pair.b, b"the only packet of this payload")
    await acknowledged(pair.pc_a)
    assert wire.dropped == 1
    assert wire.retransmissions >= 1


async def test_delayed_sack_still_acknowledges_the_last_packet(pairs) -> None:
    pair = await pairs(True, True)
    assert pair.pc_a.sctp._peer_tuned and pair.pc_b.sctp._peer_tuned, "each saw the other's 8 MiB window"
    deferred: list[bool] = []
    sack = pair.pc_b.sctp._send_sack

    async def watched_sack() -> None:
        await sack()
        deferred.append(pair.pc_b.sctp._sack_needed)  # still needed: the SACK was left to the timer

    pair.pc_b.sctp._send_sack = watched_sack
    await acknowledged(pair.pc_a)
    wire_a, wire_b = Wire(), Wire()
    wire_a.install(pair.pc_a)
    wire_b.install(pair.pc_b)
    deferred.clear()
    pair.a.send_control({"type": "ping", "nonce": 1})
    await acknowledged(pair.pc_a)
    assert sum(wire_a.sent.values()) == 1 and wire_a.retransmissions == 0, "acknowledged without a T3 retransmit"
    assert wire_b.sacks == 1
    assert deferred[0] is True, "a single in-order packet is not acknowledged at once"


def test_sacks_cover_several_packets_and_ice_sockets_get_the_larger_buffer() -> None:
    """Under uvloop (the network process's loop) a burst is acknowledged every few packets, not each one."""
    pytest.importorskip("uvloop")

    async def burst(tuned: bool) -> tuple[Wire, Wire, list[int]]:
        if tuned:
            apply_sctp_tuning()  # stays on through negotiation: aioice sizes the buffers when it gathers
        pc_a, pc_b = new_pc(), new_pc()
        a, b = Link(pc_a, peer="b", settings=QUICK), Link(pc_b, peer="a", settings=QUICK)
        try:
            await negotiate(pc_a, pc_b)
            remove_sctp_tuning()
            await asyncio.gather(a.wait_open(), b.wait_open())
            sender, receiver = Wire(), Wire()
            sender.install(pc_a)
            receiver.install(pc_b)
            await transfer(a, b, os.urandom(2**20))
            await acknowledged(pc_a)
            buffers = [
                protocol.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                for pc in (pc_a, pc_b)
                for protocol in pc.sctp.transport.transport._connection._protocols
            ]
            return sender, receiver, buffers
        finally:
            await asyncio.gather(a.close(), b.close())

    untuned_data, untuned_acks, untuned_buffers = tuning.run(burst(tuned=False))
    tuned_data, tuned_acks, tuned_buffers = tuning.run(burst(tuned=True))
    assert untuned_acks.sacks >= 0.9 * len(untuned_data.sent), "aiortc acknowledges each packet"
    assert len(tuned_data.sent) > 800  # 1 MiB in 1,189-byte packets (plus a few records)
    assert tuned_acks.sacks <= len(tuned_data.sent) / 3

    rmem_max = Path("/proc/sys/net/core/rmem_max")
    if not rmem_max.exists():
        pytest.skip("receive buffer sizes are checked against Linux's rmem_max")
    cap = int(rmem_max.read_text())
    # Linux grants min(asked, rmem_max) and reports twice that.
    assert set(tuned_buffers) == {2 * min(UDP_RECEIVE_BUFFER_BYTES, cap)}
    assert set(untuned_buffers) == {2 * min(262144, cap)}


async def test_tuned_and_untuned_peers_exchange_payloads_both_ways(pairs) -> None:
    for tuned_a, tuned_b in ((True, False), (False, True)):
        pair = await pairs(tuned_a, tuned_b)
        wire_a, wire_b = Wire(), Wire()
        wire_a.install(pair.pc_a)
        wire_b.install(pair.pc_b)
        forth, back = os.urandom(2 * 2**20 + 17), os.urandom(2**20 + 5)
        await asyncio.gather(transfer(pair.a, pair.b, forth), transfer(pair.b, pair.a, back))
        pair.a.send_control({"type": "ping", "nonce": 2})
        pair.b.send_control({"type": "ping", "nonce": 3})
        await asyncio.gather(acknowledged(pair.pc_a), acknowledged(pair.pc_b))
        assert pair.a.stats.frames_refused == pair.b.stats.frames_refused == 0
        # The tuned side saw an untuned peer's window, so it acknowledges each packet, as aiortc expects.
        tuned_pc, tuned_wire, untuned_wire = (pair.pc_a, wire_a, wire_b) if tuned_a else (pair.pc_b, wire_b, wire_a)
        assert tuned_pc.sctp._peer_tuned is False
        assert tuned_wire.sacks >= 0.9 * len(untuned_wire.sent)


async def _sack_after(received: list[int], duplicates: int, kind: type[RTCSctpTransport]) -> SackChunk:
    """The SACK a ``kind`` transport sends once the TSNs ``received`` (offsets) arrived, some twice."""
    sctp = kind(_Dtls())
    sctp._last_received_tsn = tsn_minus_one(2**32 - 100)  # the offsets cross the TSN wrap
    sent: list[SackChunk] = []

    async def capture(chunk: SackChunk) -> None:
        sent.append(chunk)

    async def receive(stream_id: int, pp_id: int, data: bytes) -> None:
        pass

    sctp._send_chunk, sctp._receive = capture, receive
    arriving = [(2**32 - 100 + offset) % 2**32 for offset in received]
    for tsn in arriving + arriving[:duplicates]:
        chunk = DataChunk(flags=SCTP_DATA_FIRST_FRAG | SCTP_DATA_LAST_FRAG)
        chunk.tsn, chunk.stream_id, chunk.user_data = tsn, 1, b"x"
        await sctp._receive_data_chunk(chunk)
    await sctp._send_sack()  # the peer is not known to be tuned: a SACK is due at once
    assert len(sent) == 1
    return sent[0]


async def test_a_sack_after_scattered_losses_fits_one_packet_and_reports_the_lowest_gaps() -> None:
    """Every other TSN of 1,000 lost: 500 gaps, more than one packet holds (aiortc sends them all)."""
    received = list(range(1, 1000, 2))
    untuned = await _sack_after(received, 0, RTCSctpTransport)
    assert SCTP_COMMON_HEADER_LENGTH + len(bytes(untuned)) > 1500, "aiortc's SACK outgrows what its DTLS carries"

    sack = await _sack_after(received, 40, TunedSctpTransport)
    assert SCTP_COMMON_HEADER_LENGTH + len(bytes(sack)) <= SCTP_MAX_PACKET_LENGTH
    assert sack.cumulative_tsn == tsn_minus_one(2**32 - 100)
    assert sack.gaps == [(offset + 1, offset + 1) for offset in received[:SACK_MAX_ENTRIES]]  # the lowest gaps
    assert sack.duplicates == []  # no room left: duplicates are only informational

    few_gaps = await _sack_after([1, 2, 5, *range(7, 900)], 600, TunedSctpTransport)
    assert few_gaps.gaps == [(2, 3), (6, 6), (8, 900)]
    assert len(few_gaps.duplicates) == SACK_MAX_ENTRIES - 3  # duplicates fill what the gaps leave
    assert SCTP_COMMON_HEADER_LENGTH + len(bytes(few_gaps)) <= SCTP_MAX_PACKET_LENGTH


async def test_a_gap_is_acknowledged_at_once_even_with_delayed_sacks() -> None:
    """Towards a tuned peer an in-order packet waits for the timer; one past a gap is acknowledged at once."""
    sctp = TunedSctpTransport(_Dtls())
    sctp._peer_tuned = True
    sctp._association_state = RTCSctpTransport.State.ESTABLISHED
    sctp._last_received_tsn = 999
    sent: list[SackChunk] = []

    async def capture(chunk: SackChunk) -> None:
        sent.append(chunk)

    sctp._send_chunk = capture
    try:
        for tsn in (1000, 1002):
            chunk = DataChunk(flags=SCTP_DATA_FIRST_FRAG | SCTP_DATA_LAST_FRAG)
            chunk.tsn, chunk.stream_id, chunk.user_data = tsn, 1, b"x"
            await sctp._receive_data_chunk(chunk)
            await sctp._send_sack()  # as aiortc's _handle_data does after each packet
            if tsn == 1000:
                assert sent == [] and sctp._sack_timer is not None
    finally:
        sctp._cancel_sack_timer()
    assert len(sent) == 1
    assert sent[0].cumulative_tsn == 1000 and sent[0].gaps == [(2, 2)]


async def test_a_burst_of_scattered_losses_both_ways_is_recovered(pairs) -> None:
    """Every other packet of a full window lost twice over (a receive buffer overflowing under load), both ways.

    Hundreds of gaps follow. With aiortc's SACKs, each outgrows the 1,500 bytes its DTLS carries and is lost:
    the sender hears nothing, retransmits one chunk per T3 expiry and the keepalive closes the link (issue 8).
    """
    pair = await pairs(True, True)
    wires = []
    for pc in (pair.pc_a, pair.pc_b):
        first = pc.sctp._local_tsn
        wire = Wire(drop=lambda tsn, sent, first=first: sent == 1 and 100 <= (tsn - first) % 2**32 < 1900 and tsn % 2)
        wire.install(pc)
        wires.append(wire)
    forth, back = os.urandom(2 * 2**20), os.urandom(2 * 2**20 + 3)
    await asyncio.gather(transfer(pair.a, pair.b, forth), transfer(pair.b, pair.a, back))
    for wire in wires:
        assert wire.dropped > 400
        assert wire.retransmissions >= wire.dropped
        assert 0 < wire.longest_sack <= SCTP_MAX_PACKET_LENGTH


async def test_data_in_flight_stays_under_the_flight_cap(pairs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer announces 8 MiB, but no more than MAX_FLIGHT_BYTES leave unacknowledged: an 8 MiB flight
    overflowed the peer's UDP receive buffer and the transfer crawled through loss recovery."""
    cap = 128 * 2**10
    monkeypatch.setattr(tuning, "MAX_FLIGHT_BYTES", cap)
    pair = await pairs(True, True)
    sctp = pair.pc_a.sctp
    highest = [0]
    increase = sctp._flight_size_increase

    def watched(chunk: DataChunk) -> None:
        increase(chunk)
        highest[0] = max(highest[0], sctp._flight_size)

    monkeypatch.setattr(sctp, "_flight_size_increase", watched)
    await transfer(pair.a, pair.b, os.urandom(2 * 2**20))
    assert sctp._cwnd > cap  # the window alone would have let more out
    assert 0 < highest[0] <= cap + aiortc.rtcsctptransport.USERDATA_MAX_LENGTH


# --- batched sends (UDP GSO) ---------------------------------------------------------------------------------


@pytest.fixture
def gso(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """GSO on (this is Linux) with fresh counters; whatever a test turns off is put back after it."""
    monkeypatch.setattr(tuning._DatagramBatch, "gso_working", True)
    stats = {"sendmsg": 0, "datagrams": 0}
    monkeypatch.setattr(tuning._DatagramBatch, "stats", stats)
    return stats


async def test_a_burst_leaves_in_segmented_sends_and_arrives_bit_exact(pairs, gso: dict[str, int]) -> None:
    pair = await pairs(True, True)
    await transfer(pair.a, pair.b, os.urandom(3 * 2**20 + 11))
    assert gso["sendmsg"] > 0
    assert gso["datagrams"] >= 2 * gso["sendmsg"]  # several datagrams per syscall (a SACK's worth, often)
    assert gso["datagrams"] > 0.5 * (3 * 2**20) / 1200  # most of the payload's ~2,600 packets went that way


async def test_an_untuned_sender_sends_one_datagram_per_syscall(pairs, gso: dict[str, int]) -> None:
    pair = await pairs(False, True)
    await transfer(pair.a, pair.b, os.urandom(2**20))
    assert gso == {"sendmsg": 0, "datagrams": 0}


async def test_a_kernel_refusing_gso_turns_it_off_and_payloads_still_arrive(
    pairs, gso: dict[str, int], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(*args: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(tuning, "_sendmsg", refused)
    pair = await pairs(True, True)
    with caplog.at_level(logging.WARNING, logger="hivewire.mesh.tuning"):
        await transfer(pair.a, pair.b, os.urandom(2**20 + 3))
    assert tuning._DatagramBatch.gso_working is False
    assert sum("UDP GSO refused" in record.message for record in caplog.records) == 1
    assert gso["sendmsg"] == 0


async def test_a_full_socket_buffer_falls_back_to_the_transport_in_order(
    pairs, gso: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [0]
    real = tuning._sendmsg

    def every_other_one_full(*args: object) -> int:
        calls[0] += 1
        if calls[0] % 2:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return real(*args)

    monkeypatch.setattr(tuning, "_sendmsg", every_other_one_full)
    pair = await pairs(True, True)
    await asyncio.gather(
        transfer(pair.a, pair.b, os.urandom(2 * 2**20 + 1)), transfer(pair.b, pair.a, os.urandom(2**20 + 9))
    )
    assert tuning._DatagramBatch.gso_working is True  # a full buffer is no reason to give GSO up
    assert calls[0] > 2 and gso["sendmsg"] > 0


async def test_only_a_plain_udp_pair_is_batched_never_a_turn_relayed_one() -> None:
    """Over TURN each datagram must go through the relay's framing: batching there would bypass the relay."""
    loop = asyncio.get_running_loop()
    protocol = aioice.ice.StunProtocol(receiver=None)
    udp, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    pair = SimpleNamespace(protocol=protocol)
    sctp = SimpleNamespace(transport=SimpleNamespace(transport=SimpleNamespace(_connection=SimpleNamespace())))
    sctp.transport.transport._connection._nominated = {1: pair}
    try:
        protocol.transport = object.__new__(aioice.turn.TurnTransport)  # what aioice gives a relay candidate
        assert tuning._DatagramBatch.open(sctp) is None
        protocol.transport = udp
        batch = tuning._DatagramBatch.open(sctp)
        assert batch is not None and "send_data" in vars(protocol)
        assert tuning._DatagramBatch.open(sctp) is None  # one batch at a time
        batch.flush()
        assert "send_data" not in vars(protocol)  # aioice's own method again
    finally:
        udp.close()


# --- control messages first ------------------------------------------------------------------------------------


async def _queue_order_after_control(pair: Pair) -> list[str]:
    """Labels of what a's association still queues once a control message follows a large bulk payload."""
    sending = asyncio.create_task(pair.a.send_payload(os.urandom(8 * 2**20)))
    async with asyncio.timeout(DEADLINE_S):
        while len(pair.pc_a.sctp._data_channel_queue) < 2:  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0)
    pair.a.send_control({"type": "ping", "nonce": 7})
    order = [channel.label for channel, _, _ in pair.pc_a.sctp._data_channel_queue]
    _, received = await asyncio.wait_for(pair.b.recv_payload(), DEADLINE_S)
    await asyncio.wait_for(sending, DEADLINE_S)
    assert len(received) == 8 * 2**20
    return order


async def test_a_control_message_goes_ahead_of_queued_bulk_data(pairs) -> None:
    tuned = await _queue_order_after_control(await pairs(True, True))
    assert tuned[0] == "hivewire-control" and set(tuned[1:]) == {"hivewire-bulk"}
    untuned = await _queue_order_after_control(await pairs(False, True))  # aiortc's order: last in line
    assert untuned[-1] == "hivewire-control" and set(untuned[:-1]) == {"hivewire-bulk"}
