"""A link between two real aiortc peer connections on loopback proves: control records and a 20 MB payload
arrive intact; bad frames and records are refused while the link keeps working; memory stays bounded by
backpressure and credit; a peer that goes away is reported dead within keepalive_timeout_s; close() leaves
no task behind, even when ICE never completes."""

import asyncio
import logging
import os
import re
from collections.abc import Callable

import pytest
from aiortc import RTCSessionDescription

from hivewire.mesh import FramingLimits, Link, LinkError, LinkSettings, RecordSchema
from hivewire.mesh.framing import (
    DEFAULT_REMOTE_MESSAGE_BYTES,
    FRAMING_VERSION,
    HEADER,
    KIND_CHUNK,
    MAX_MESSAGE_BYTES,
)

from .conftest import loopback_sdp, negotiate, new_pc

QUICK = LinkSettings(keepalive_interval_s=0.2, keepalive_timeout_s=1.5, open_timeout_s=10)
DEADLINE_S = 10  # generous bound on any single wait, so a broken link fails the test instead of hanging it


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not predicate():  # noqa: ASYNC110 - stats counters have no event to wait on
            await asyncio.sleep(0.01)


async def test_control_records_round_trip(link_pair) -> None:
    schema = RecordSchema("gossip", {"epoch": int, "note": str})
    a, b = await link_pair(schemas=[schema])
    a.send_control({"type": "gossip", "epoch": 7, "note": "hello"})
    assert await asyncio.wait_for(b.recv_control(), DEADLINE_S) == {"type": "gossip", "epoch": 7, "note": "hello"}


@pytest.mark.slow
async def test_20_mb_payload_arrives_intact(link_pair) -> None:
    a, b = await link_pair()
    data = os.urandom(20 * 2**20)
    sending = asyncio.create_task(a.send_payload(data))
    payload_id, received = await asyncio.wait_for(b.recv_payload(), 60)
    assert await sending == payload_id == 1
    assert received == data
    assert b.stats.payloads_received == 1
    assert b.stats.frames_refused == 0
    assert a.stats.max_buffered_bytes <= a.settings.buffer_high_bytes + MAX_MESSAGE_BYTES


async def test_backpressure_bounds_the_send_buffer(link_pair) -> None:
    high = 128 * 2**10
    settings = LinkSettings(buffer_high_bytes=high, buffer_low_bytes=32 * 2**10)
    a, b = await link_pair(settings, settings)
    data = os.urandom(4 * 2**20)
    sending = asyncio.create_task(a.send_payload(data))
    assert (await asyncio.wait_for(b.recv_payload(), 60))[1] == data
    await sending
    assert high < a.stats.max_buffered_bytes <= high + MAX_MESSAGE_BYTES


async def test_sender_waits_for_receiver_credit(link_pair) -> None:
    settings = LinkSettings(framing=FramingLimits(max_incoming_payloads=2))
    a, b = await link_pair(settings, settings)
    await a.send_payload(b"one")
    await a.send_payload(b"two")
    third = asyncio.create_task(a.send_payload(b"three"))
    await until(lambda: b.stats.payloads_received == 2)
    await asyncio.sleep(0.2)
    assert not third.done(), "a third payload must wait until the receiver takes one"
    assert await b.recv_payload() == (1, bytearray(b"one"))
    assert await asyncio.wait_for(third, DEADLINE_S) == 3
    assert [await b.recv_payload() for _ in range(2)] == [(2, bytearray(b"two")), (3, bytearray(b"three"))]


def _corrupt(link: Link, frame_index: int) -> None:
    """Flip one bit of the frame_index-th frame the link sends next, as a faulty path would."""
    channel = link.bulk_channel
    send = channel.send
    count = 0

    def corrupting_send(data: bytes | str) -> None:
        nonlocal count
        if count == frame_index:
            flipped = bytearray(data)  # type: ignore[arg-type]
            flipped[-1] ^= 0x01
            data = bytes(flipped)
        count += 1
        send(data)

    channel.send = corrupting_send  # type: ignore[method-assign]


@pytest.mark.parametrize("frame_index", [0, 2], ids=["bad-checksum", "corrupted-chunk"])
async def test_corrupted_payload_is_refused_and_the_link_goes_on(link_pair, frame_index: int) -> None:
    a, b = await link_pair()
    data = os.urandom(3 * MAX_MESSAGE_BYTES)
    _corrupt(a, frame_index)
    await a.send_payload(data)
    await until(lambda: a.stats.payloads_refused_by_peer == 1)
    assert b.stats.frames_refused == 1
    assert b.stats.payloads_received == 0
    await a.send_payload(b"after")
    assert await asyncio.wait_for(b.recv_payload(), DEADLINE_S) == (2, bytearray(b"after"))


@pytest.mark.parametrize(
    "frame",
    [
        b"\x01\x02",
        HEADER.pack(FRAMING_VERSION + 1, KIND_CHUNK, 0, 1, 0) + b"x",
        HEADER.pack(FRAMING_VERSION, 9, 0, 1, 0) + b"x",
        "a text message",
    ],
    ids=["malformed-header", "wrong-version", "unknown-kind", "text"],
)
async def test_malformed_frame_is_refused_and_the_link_goes_on(link_pair, frame: bytes | str) -> None:
    a, b = await link_pair()
    a.bulk_channel.send(frame)
    await until(lambda: b.stats.frames_refused == 1)
    await a.send_payload(b"still fine")
    assert await asyncio.wait_for(b.recv_payload(), DEADLINE_S) == (1, bytearray(b"still fine"))


async def test_oversize_payload_is_refused_by_the_receiver(link_pair) -> None:
    a, b = await link_pair(settings_b=LinkSettings(framing=FramingLimits(max_payload_bytes=1000)))
    await a.send_payload(os.urandom(5000))
    await until(lambda: a.stats.payloads_refused_by_peer == 1)
    assert b.stats.payloads_received == 0
    await a.send_payload(b"small")
    assert await asyncio.wait_for(b.recv_payload(), DEADLINE_S) == (2, bytearray(b"small"))


@pytest.mark.parametrize(
    "record",
    [b"\xc1", b"\x81\xa4type\xa8teleport", "text"],
    ids=["not-msgpack", "unknown-type", "text"],
)
async def test_invalid_control_record_is_dropped_and_the_link_goes_on(link_pair, record: bytes | str) -> None:
    schema = RecordSchema("gossip", {"epoch": int})
    a, b = await link_pair(schemas=[schema])
    a.control_channel.send(record)
    await until(lambda: b.stats.records_refused == 1)
    a.send_control({"type": "gossip", "epoch": 1})
    assert await asyncio.wait_for(b.recv_control(), DEADLINE_S) == {"type": "gossip", "epoch": 1}


async def test_keepalive_measures_round_trip_time(link_pair) -> None:
    a, _ = await link_pair(QUICK, QUICK)
    await until(lambda: a.rtt_s is not None)
    assert a.rtt_s is not None
    assert 0 < a.rtt_s < QUICK.keepalive_timeout_s


async def test_peer_that_closes_is_reported_dead(link_pair) -> None:
    deaths: list[str] = []
    a, b = await link_pair(QUICK, QUICK, on_dead=lambda link, reason: deaths.append(reason))
    await b.close()
    async with asyncio.timeout(QUICK.keepalive_timeout_s + QUICK.keepalive_interval_s):
        await a.wait_closed()
    assert len(deaths) == 1
    with pytest.raises(LinkError, match="is closed"):
        await a.send_payload(b"x")
    with pytest.raises(LinkError, match="is closed"):
        await a.recv_payload()


async def test_silent_peer_is_reported_dead_after_the_keepalive_timeout() -> None:
    """The far side has the channels but never answers pings: only the keepalive can notice."""
    deaths: list[str] = []
    pc_a, pc_b = new_pc(), new_pc()
    a = Link(pc_a, peer="silent", settings=QUICK, on_dead=lambda link, reason: deaths.append(reason))
    pc_b.createDataChannel("hivewire-control", negotiated=True, id=0)
    pc_b.createDataChannel("hivewire-bulk", negotiated=True, id=1)
    try:
        await negotiate(pc_a, pc_b)
        await a.wait_open()
        async with asyncio.timeout(QUICK.keepalive_timeout_s + 2 * QUICK.keepalive_interval_s):
            await a.wait_closed()
        assert len(deaths) == 1
        assert "keepalive_timeout_s=1.5" in deaths[0]
    finally:
        await a.close()
        await pc_b.close()


async def test_close_leaves_no_pending_tasks(link_pair) -> None:
    a, b = await link_pair(QUICK, QUICK)
    waiting = asyncio.create_task(b.recv_payload())
    await a.send_payload(os.urandom(2**20))
    await a.close()
    await b.close()
    with pytest.raises(LinkError):
        await waiting
    await a.close()  # idempotent
    await asyncio.sleep(0)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_ice_that_never_completes_closes_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    """Candidates that lead nowhere (port 9 on loopback): open times out, close leaves no tracebacks."""
    settings = LinkSettings(open_timeout_s=1.0)
    pc_a, pc_b = new_pc(), new_pc()
    a, b = Link(pc_a, peer="b", settings=settings), Link(pc_b, peer="a", settings=settings)

    def nowhere(description: RTCSessionDescription | None) -> RTCSessionDescription:
        sdp = loopback_sdp(description).sdp
        return RTCSessionDescription(sdp=re.sub(r"(127\.0\.0\.1 )\d+", r"\g<1>9", sdp), type=description.type)

    with caplog.at_level(logging.ERROR):
        await pc_a.setLocalDescription(await pc_a.createOffer())
        await pc_b.setRemoteDescription(nowhere(pc_a.localDescription))
        await pc_b.setLocalDescription(await pc_b.createAnswer())
        await pc_a.setRemoteDescription(nowhere(pc_b.localDescription))
        results = await asyncio.gather(a.wait_open(), b.wait_open(), return_exceptions=True)
        await a.close()
        await b.close()
        await asyncio.sleep(0)
    assert all(isinstance(r, LinkError) and "open_timeout_s=1.0" in str(r) for r in results), results
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_frames_shrink_when_the_remote_sdp_lacks_max_message_size() -> None:
    """RFC 8841: no a=max-message-size means 65,536 bytes; larger frames would make aiortc raise."""
    pc_a, pc_b = new_pc(), new_pc()
    a, b = Link(pc_a, peer="b"), Link(pc_b, peer="a")
    try:
        await pc_a.setLocalDescription(await pc_a.createOffer())
        await pc_b.setRemoteDescription(loopback_sdp(pc_a.localDescription))
        await pc_b.setLocalDescription(await pc_b.createAnswer())
        answer = loopback_sdp(pc_b.localDescription)
        stripped = re.sub(r"a=max-message-size:\d+\r\n", "", answer.sdp)
        await pc_a.setRemoteDescription(RTCSessionDescription(sdp=stripped, type=answer.type))
        await asyncio.gather(a.wait_open(), b.wait_open())
        sizes: list[int] = []
        send = a.bulk_channel.send
        a.bulk_channel.send = lambda data: (sizes.append(len(data)), send(data))[1]  # type: ignore[method-assign]
        data = os.urandom(300_000)
        await a.send_payload(data)
        assert (await asyncio.wait_for(b.recv_payload(), DEADLINE_S))[1] == data
        assert max(sizes) == DEFAULT_REMOTE_MESSAGE_BYTES
    finally:
        await a.close()
        await b.close()


async def test_payloads_wait_for_the_link_to_open() -> None:
    link = Link(new_pc(), peer="nobody")
    try:
        with pytest.raises(LinkError, match="not open yet"):
            await link.send_payload(b"x")
    finally:
        await link.close()
