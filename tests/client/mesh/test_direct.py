"""The direct TLS path between two real aiortc links on loopback proves: bulk payloads take it when both
sides listen and arrive bit-identical; a certificate other than the signed one is refused and the link stays
on WebRTC; a dial that cannot connect (nothing listening, a silent listener) leaves the link on WebRTC; a
stream killed mid-transfer loses and duplicates nothing; hostile bytes on the stream are refused like on
the data channel; a peer without the direct path interoperates; flush() waits for the peer's releases."""

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Callable

import pytest
from aiortc.rtcdtlstransport import RTCCertificate
from cryptography.hazmat.primitives import serialization

from hivewire.mesh import ControlCodec, ControlRecordError, DirectEndpoint, DirectSettings, Link, LinkSettings
from hivewire.mesh import direct as direct_module
from hivewire.mesh.direct import LENGTH, PATH_DIRECT, PATH_WEBRTC
from hivewire.mesh.framing import FRAMING_VERSION, HEADER, KIND_START, FramingLimits, encode_payload

from .conftest import LOOPBACK, negotiate, new_pc

DEADLINE_S = 20  # bound on any single wait, so a broken path fails the test instead of hanging it
LOCAL = DirectSettings(listen_addresses=(LOOPBACK,), connect_timeout_s=1.0, handshake_timeout_s=1.0)
SETTINGS = LinkSettings(open_timeout_s=10)


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not predicate():  # noqa: ASYNC110 - link state has no event to wait on
            await asyncio.sleep(0.005)


@pytest.fixture
async def endpoints() -> AsyncIterator[Callable[..., object]]:
    """Factory for a started DirectEndpoint; every one is closed at teardown."""
    made: list[DirectEndpoint] = []

    async def make(settings: DirectSettings = LOCAL) -> DirectEndpoint:
        endpoint = DirectEndpoint(settings)
        made.append(endpoint)
        await endpoint.start()
        return endpoint

    yield make
    for endpoint in made:
        await endpoint.close()


@pytest.fixture
async def direct_pair() -> AsyncIterator[Callable[..., object]]:
    """Factory for an open pair of links whose sides use the given endpoints (None: direct path off)."""
    links: list[Link] = []

    async def make(
        direct_a: DirectEndpoint | None,
        direct_b: DirectEndpoint | None,
        *,
        b_late_s: float = 0,
        settings_b: LinkSettings = SETTINGS,
    ) -> tuple[Link, Link]:
        pc_a, pc_b = new_pc(), new_pc()
        a = Link(pc_a, peer="b", settings=SETTINGS, codec=ControlCodec(), direct=direct_a)
        b = Link(pc_b, peer="a", settings=settings_b, codec=ControlCodec(), direct=direct_b)
        links.extend((a, b))
        await negotiate(pc_a, pc_b)
        await a.wait_open()
        await asyncio.sleep(b_late_s)  # B's side may take longer to notice its channels opened
        await b.wait_open()
        return a, b

    yield make
    for link in links:
        await link.close()


async def exchange(sender: Link, receiver: Link, payloads: list[bytes]) -> list[tuple[int, bytearray]]:
    """Send payloads one after another while the receiver takes them; return what it took."""

    async def send_all() -> None:
        for payload in payloads:
            await sender.send_payload(payload)

    sending = asyncio.create_task(send_all())
    async with asyncio.timeout(DEADLINE_S * 3):
        received = [await receiver.recv_payload() for _ in payloads]
        await sending
    return received


async def test_payloads_take_the_direct_path_and_arrive_bit_identical(direct_pair, endpoints) -> None:
    a, b = await direct_pair(await endpoints(), await endpoints())
    await until(lambda: a.path == b.path == PATH_DIRECT)
    assert a.direct_state == b.direct_state == "up"
    forth = [os.urandom(3 * 2**20), b"", os.urandom(100_000)]
    back = [os.urandom(2 * 2**20)]
    received_b, received_a = await asyncio.gather(exchange(a, b, forth), exchange(b, a, back))
    assert received_b == [(i, bytearray(p)) for i, p in enumerate(forth, 1)]
    assert received_a == [(1, bytearray(p)) for p in back]
    assert a.stats.payloads_sent_direct == b.stats.payloads_received_direct == len(forth)
    assert b.stats.payloads_sent_direct == a.stats.payloads_received_direct == len(back)
    assert a.stats.frames_refused == b.stats.frames_refused == 0
    assert a.send_rate_bytes_per_s is not None and b.recv_rate_bytes_per_s is not None
    assert a.throughput_bytes_per_s is not None
    assert await a.flush(DEADLINE_S)


async def test_a_hello_that_arrives_before_our_side_opened_is_not_lost(direct_pair, endpoints) -> None:
    a, b = await direct_pair(await endpoints(), await endpoints(), b_late_s=0.5)
    await until(lambda: a.path == b.path == PATH_DIRECT)


async def test_a_tls_certificate_other_than_the_signed_one_is_refused(direct_pair, endpoints, monkeypatch) -> None:
    """B announces its genuine certificate but presents another in TLS: A refuses, bulk stays on WebRTC."""
    impostor = RTCCertificate.generateCertificate()
    genuine = direct_module._load_chain
    b_certificates: list[RTCCertificate] = []

    def load_chain(context, own: RTCCertificate) -> None:
        genuine(context, impostor if own in b_certificates else own)

    monkeypatch.setattr(direct_module, "_load_chain", load_chain)
    original_session = direct_module.DirectSession

    class Recording(original_session):
        """Notes B's DTLS certificate, so the patched loader swaps exactly that one."""

        def __init__(self, endpoint, pc, **kwargs) -> None:
            super().__init__(endpoint, pc, **kwargs)
            if kwargs["peer"] == "a":
                b_certificates.append(self._own)

    monkeypatch.setattr("hivewire.mesh.link.DirectSession", Recording)
    a, b = await direct_pair(await endpoints(), await endpoints())
    await until(lambda: a.direct_state == "refused")
    assert "certificate other than the signed one" in (a.direct_refusal or "")
    assert a.path == b.path == PATH_WEBRTC
    payload = os.urandom(300_000)
    assert await exchange(a, b, [payload]) == [(1, bytearray(payload))]
    assert await exchange(b, a, [payload]) == [(1, bytearray(payload))]
    assert a.stats.payloads_sent_direct == b.stats.payloads_sent_direct == 0


async def test_a_hello_whose_certificate_was_not_signed_is_refused(direct_pair, endpoints) -> None:
    a, b = await direct_pair(await endpoints(), None)
    stranger = RTCCertificate.generateCertificate()._cert.public_bytes(serialization.Encoding.DER)
    b.send_control({"type": "direct_hello", "cert": stranger, "token": "ab" * 16, "addresses": [[LOOPBACK, 9]]})
    await until(lambda: a.direct_state == "refused")
    assert "does not match the fingerprints it signed" in (a.direct_refusal or "")
    payload = os.urandom(100_000)
    assert await exchange(a, b, [payload]) == [(1, bytearray(payload))]
    assert a.path == PATH_WEBRTC


async def test_nothing_listening_leaves_the_link_on_webrtc(direct_pair, endpoints) -> None:
    """Both sides announce a port and then stop listening: each dial is refused, the link carries on."""
    endpoint_a, endpoint_b = await endpoints(), await endpoints()
    a, b = await direct_pair(endpoint_a, endpoint_b)
    await endpoint_a.close()
    await endpoint_b.close()  # after the hellos left: both announced a port nobody listens on any more
    await until(lambda: "unreachable" in (a.direct_state, b.direct_state))
    payload = os.urandom(200_000)
    assert await exchange(a, b, [payload]) == [(1, bytearray(payload))]
    assert a.path == b.path == PATH_WEBRTC


def order_dialers(monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    """Make the session of the link whose own side is ``first`` ("a" or "b") dial first (smaller token)."""
    original = direct_module.DirectSession

    class Ordered(original):
        def __init__(self, endpoint, pc, **kwargs) -> None:
            super().__init__(endpoint, pc, **kwargs)
            own_side = "b" if kwargs["peer"] == "a" else "a"
            self._token = bytes(16) if own_side == first else b"\xff" * 16

    monkeypatch.setattr("hivewire.mesh.link.DirectSession", Ordered)


async def test_a_silent_listener_times_out_and_the_other_side_dials_back(direct_pair, endpoints, monkeypatch) -> None:
    """A's announced port accepts TCP but never answers (a middlebox): B times out; then A dials B."""
    silent_connections: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_connections.append(writer)

    silent = await asyncio.start_server(swallow, LOOPBACK, 0)
    port = silent.sockets[0].getsockname()[1]
    order_dialers(monkeypatch, first="b")
    try:
        endpoint_a = await endpoints(DirectSettings(listen_addresses=(), connect_timeout_s=1, handshake_timeout_s=0.5))
        endpoint_a.addresses = [(LOOPBACK, port)]  # announce the silent port as ours
        a, b = await direct_pair(endpoint_a, await endpoints())
        await until(lambda: a.path == b.path == PATH_DIRECT)
        assert len(silent_connections) == 1, "B tries A's announced (silent) port first, and only once"
        assert b.direct_stream is not None and b.direct_stream.frames_received == 0
    finally:
        for writer in silent_connections:
            writer.close()
        silent.close()
        await silent.wait_closed()


@pytest.mark.parametrize("killer", ["sender", "receiver"])
async def test_a_stream_killed_mid_transfer_loses_and_duplicates_nothing(direct_pair, endpoints, killer) -> None:
    a, b = await direct_pair(await endpoints(), await endpoints())
    await until(lambda: a.path == b.path == PATH_DIRECT)
    payloads = [os.urandom(2**18), os.urandom(6 * 2**20), os.urandom(2**18), os.urandom(2**19)]
    killed = (a if killer == "sender" else b).direct_stream
    receiving = b.direct_stream
    assert killed is not None and receiving is not None
    sending = asyncio.create_task(exchange(a, b, payloads))
    await until(lambda: receiving.frames_received >= 5)  # inside the 6 MiB payload (24 frames)
    # The receiver stops reading, so the sender surely has unreleased payloads in flight when it dies.
    receiving.transport.pause_reading()  # stands for a stalled network
    killed.abort("killed by the test")
    if killer == "sender":
        receiving.transport.resume_reading()  # the network comes back: the receiver sees the reset
    received = await sending
    assert [payload_id for payload_id, _ in received] == [1, 2, 3, 4]
    assert [bytes(data) for _, data in received] == payloads
    assert a.stats.payloads_resent >= 1
    assert b.stats.payloads_received_direct + b.stats.duplicates_dropped >= 1
    await until(lambda: a.stats.direct_streams_lost == b.stats.direct_streams_lost == 1)
    assert a.path == b.path == PATH_WEBRTC
    assert await a.flush(DEADLINE_S)
    await asyncio.sleep(0.3)  # duplicates still travelling would show up here
    assert b.stats.payloads_received == len(payloads)
    # Each payload sent again either had not arrived over the stream (it came over WebRTC) or is a duplicate
    # (the last of those may still be on its way: its release can overtake its tail).
    over_webrtc = len(payloads) - b.stats.payloads_received_direct
    await until(lambda: a.stats.payloads_resent == over_webrtc + b.stats.duplicates_dropped)
    if killer == "receiver":  # what the receiver had not read died with its socket
        assert over_webrtc >= 1
    assert a.stats.payloads_refused_by_peer == a.stats.records_refused == 0


async def test_hostile_frames_on_the_stream_are_refused_like_on_the_channel(direct_pair, endpoints) -> None:
    a, b = await direct_pair(await endpoints(), await endpoints())
    await until(lambda: a.path == b.path == PATH_DIRECT)
    stream = a.direct_stream
    assert stream is not None
    bad_version = HEADER.pack(FRAMING_VERSION + 1, KIND_START, 0, 50, 10) + bytes(32)
    oversize = HEADER.pack(FRAMING_VERSION, KIND_START, 0, 51, b.settings.framing.max_payload_bytes + 1) + bytes(32)
    await stream.send_frames([bad_version, oversize])
    await until(lambda: b.stats.frames_refused == 2)
    assert b.path == PATH_DIRECT, "a refused frame leaves the stream up, as on the data channel"
    await until(lambda: a.stats.records_refused == 1)  # B's bulk_refused for 51, which A never sent
    # A length the receiver cannot accept cannot be skipped: the stream is closed, the link goes on.
    stream.transport.write(LENGTH.pack(b.settings.framing.max_frame_bytes + 1))  # raw hostile bytes
    await until(lambda: b.path == PATH_WEBRTC and a.path == PATH_WEBRTC)
    payload = os.urandom(500_000)
    assert await exchange(a, b, [payload]) == [(1, bytearray(payload))]


async def test_a_peer_without_the_direct_path_interoperates(direct_pair, endpoints) -> None:
    a, b = await direct_pair(await endpoints(), None)
    payload = os.urandom(400_000)
    assert await exchange(a, b, [payload]) == [(1, bytearray(payload))]
    assert await exchange(b, a, [payload]) == [(1, bytearray(payload))]
    assert a.path == b.path == PATH_WEBRTC
    assert (a.direct_state, b.direct_state) == ("trying", "off")
    assert b.stats.records_refused == 0, "the peer without it accepts and ignores direct_hello"


async def test_flush_waits_for_the_peer_to_release(direct_pair, endpoints) -> None:
    a, b = await direct_pair(await endpoints(), await endpoints())
    await until(lambda: a.path == PATH_DIRECT)
    assert await a.flush(0.1), "nothing sent: nothing to wait for"
    await a.send_payload(b"x" * 1000)
    await a.send_payload(b"y" * 1000)
    assert not await a.flush(0.3), "the receiver has not taken them"
    flushing = asyncio.create_task(a.flush(DEADLINE_S))
    await b.recv_payload()
    await asyncio.sleep(0.1)
    assert not flushing.done()
    await b.recv_payload()
    assert await flushing


GOOD_HELLO = {"type": "direct_hello", "cert": b"\x30" * 400, "token": "0f" * 16, "addresses": [[LOOPBACK, 4242]]}


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"cert": b"\x30" * 4097}, "direct_hello.cert"),
        ({"cert": b""}, "direct_hello.cert"),
        ({"token": "0F" * 16}, "direct_hello.token"),
        ({"token": "0f" * 17}, "direct_hello.token"),
        ({"addresses": [[LOOPBACK, 1]] * 9}, "at most 8"),
        ({"addresses": [["not-an-ip", 1]]}, "not an IP address"),
        ({"addresses": [[LOOPBACK, 0]]}, "outside 1..65535"),
        ({"addresses": [[LOOPBACK, True]]}, "[ip, port] pairs"),
        ({"addresses": [[LOOPBACK]]}, "[ip, port] pairs"),
        ({"cert": "text"}, "expected bytes"),
    ],
)
def test_direct_hello_is_validated_before_use(change: dict[str, object], complaint: str) -> None:
    codec = ControlCodec()
    assert codec.decode(codec.encode(GOOD_HELLO)) == GOOD_HELLO
    with pytest.raises(ControlRecordError, match=re.escape(complaint)):
        codec.validate({**GOOD_HELLO, **change})


async def test_the_listener_refuses_strangers_before_tls(endpoints) -> None:
    endpoint = await endpoints()
    host, port = endpoint.addresses[0]
    for greeting in (b"HWD1" + os.urandom(16), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(greeting)
        async with asyncio.timeout(DEADLINE_S):
            with contextlib.suppress(ConnectionError):
                assert await reader.read() == b"", "no acknowledgement for an unknown token"
        writer.close()
    assert endpoint.refused == 2


async def test_announced_addresses_outside_unicast_are_not_dialled(direct_pair, endpoints) -> None:
    """A peer cannot make us connect to 0.0.0.0 or a multicast group; with nothing dialable it stays on WebRTC."""
    a, b = await direct_pair(await endpoints(), None)
    session = a._direct_session
    assert session is not None
    unspecified = "0.0.0.0"  # noqa: S104 - announced by the peer, never bound
    own = direct_module.local_certificate(b._pc)._cert.public_bytes(serialization.Encoding.DER)
    hello = {**GOOD_HELLO, "cert": own, "addresses": [[unspecified, 80], ["224.0.0.1", 80], ["::", 80]]}
    b.send_control(hello)
    await until(lambda: session._peer_cert is not None)
    assert session._peer_addresses == [(LOOPBACK, 80)], "only the SDP's own candidate, with the announced port"


async def test_after_a_drop_the_direct_path_comes_back(direct_pair, endpoints) -> None:
    quick = DirectSettings(listen_addresses=(LOOPBACK,), connect_timeout_s=1.0, redial_after_s=0.3)
    a, b = await direct_pair(await endpoints(quick), await endpoints(quick))
    await until(lambda: a.path == b.path == PATH_DIRECT)
    first = a.direct_stream
    assert first is not None
    first.abort("killed by the test")
    await until(lambda: a.path == b.path == PATH_WEBRTC)
    payload = os.urandom(300_000)
    assert await exchange(a, b, [payload]) == [(1, bytearray(payload))]  # over whichever path is up
    await until(lambda: a.path == b.path == PATH_DIRECT)
    assert a.direct_stream is not first
    # Payloads move to the stream only once none sent over the data channel is unreleased (no race).
    assert await a.flush(DEADLINE_S)
    before = a.stats.payloads_sent_direct
    assert await exchange(a, b, [payload]) == [(2, bytearray(payload))]
    assert a.stats.payloads_sent_direct == before + 1
    assert a.stats.direct_streams_lost == 1


@pytest.mark.parametrize(
    ("bad", "complaint"),
    [
        ({"port_min": 5000, "port_max": 4000}, "port_min <= port_max"),
        ({"port_max": 70000}, "port_max <= 65535"),
        ({"connect_timeout_s": 0}, "must be positive"),
        ({"listen_addresses": ("eth0",)}, "does not appear to be an IPv4 or IPv6 address"),
        ({"advertise_addresses": ("example.org",)}, "does not appear to be an IPv4 or IPv6 address"),
    ],
)
def test_direct_settings_refuse_nonsense(bad: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        DirectSettings(**bad)  # type: ignore[arg-type]


async def test_the_listener_takes_the_first_free_port_of_its_range(endpoints) -> None:
    first = await endpoints(DirectSettings(listen_addresses=(LOOPBACK,)))
    port = first.addresses[0][1]
    ranged = DirectSettings(listen_addresses=(LOOPBACK,), port_min=port, port_max=min(port + 20, 65535))
    second = await endpoints(ranged)
    assert port < second.addresses[0][1] <= port + 20


async def test_a_payload_restarted_on_the_channel_replaces_its_partial_copy(direct_pair, endpoints) -> None:
    """The sender gave up on a stream mid-payload (the receiver has not noticed yet) and starts the payload
    again on the data channel: the partial copy must not hold the slot the new one needs."""
    one_slot = LinkSettings(open_timeout_s=10, framing=FramingLimits(max_incoming_payloads=1))
    a, b = await direct_pair(await endpoints(), await endpoints(), settings_b=one_slot)
    await until(lambda: a.path == b.path == PATH_DIRECT)
    payload = os.urandom(600_000)
    frames = list(encode_payload(7, payload, 2**18))
    stream = a.direct_stream
    assert stream is not None
    await stream.send_frames(frames[:2])  # START and the first chunk over the stream
    await until(lambda: b.direct_stream is not None and b.direct_stream.frames_received == 2)
    for frame in frames:
        a.bulk_channel.send(frame)
    async with asyncio.timeout(DEADLINE_S):
        assert await b.recv_payload() == (7, bytearray(payload))
    assert b.stats.frames_refused == 0
