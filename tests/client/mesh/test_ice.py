"""ICE configuration proves: ICE servers are always explicit and checked, relay policy uses the enum, and
host candidates come only from the configured addresses; connectivity checks are bounded (ice_timing.py)
with the pinned aioice, and only they: other STUN requests keep aioice's retransmissions, and an aioice the
bound was not written for is left alone."""

import asyncio
import contextlib
import re
import socket
from collections.abc import Iterator

import aioice
import aioice.ice
import aioice.stun
import pytest
from aiortc import RTCIceTransportPolicy, RTCPeerConnection

from hivewire.mesh import IceConfigError, build_configuration, restrict_host_addresses
from hivewire.mesh.ice_timing import (
    CHECK_RETRANSMISSIONS,
    CHECK_TIMEOUT_S,
    PATCHED_AIOICE_VERSION,
    bound_connectivity_checks,
    check_bound_active,
    is_connectivity_check,
    remove_check_bound,
)

from .conftest import LOOPBACK

TURN = {"urls": ["turn:turn.example:3478?transport=udp"], "username": "1764027480:42", "credential": "c2VjcmV0"}


def test_empty_list_means_no_servers_at_all() -> None:
    config = build_configuration([])
    assert config.iceServers == []
    assert config.iceTransportPolicy is RTCIceTransportPolicy.ALL


def test_join_response_servers_are_converted() -> None:
    config = build_configuration([{"urls": "stun:stun.example:3478"}, TURN], relay_only=True)
    assert config.iceTransportPolicy is RTCIceTransportPolicy.RELAY
    stun, turn = config.iceServers or []
    assert stun.urls == ["stun:stun.example:3478"]
    assert (turn.username, turn.credential) == (TURN["username"], TURN["credential"])


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        ([{"urls": []}], "non-empty list of strings"),
        ([{"urls": ["http://example"]}], "not a stun:, turn: or turns: URL"),
        ([{"urls": ["stun:"]}], "malformed URL"),
        ([{"urls": ["stun:a"], "password": "x"}], r"unknown keys \['password'\]"),
        ([{"urls": ["turn:a"], "username": 5}], "username: expected a string, got int"),
        (["stun:a"], "expected a mapping, got str"),
    ],
)
def test_invalid_servers_are_refused(servers: list, message: str) -> None:
    with pytest.raises(IceConfigError, match=message):
        build_configuration(servers)


def test_relay_only_needs_a_turn_server() -> None:
    with pytest.raises(IceConfigError, match="relay_only needs a TURN server"):
        build_configuration([{"urls": ["stun:stun.example"]}], relay_only=True)


async def _gathered_addresses() -> set[str]:
    pc = RTCPeerConnection(build_configuration([]))
    try:
        pc.createDataChannel("probe")
        await pc.setLocalDescription(await pc.createOffer())  # gathers; sends nothing with no ICE servers
        return set(re.findall(r"a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ host", pc.localDescription.sdp))
    finally:
        await pc.close()


async def test_host_candidates_only_on_configured_addresses() -> None:
    assert await _gathered_addresses() == {LOOPBACK}


async def test_interface_names_resolve_to_their_addresses() -> None:
    try:
        restrict_host_addresses(["lo"])
        assert await _gathered_addresses() <= {LOOPBACK, "::1"}
        assert LOOPBACK in await _gathered_addresses()
    finally:
        restrict_host_addresses([LOOPBACK])


def test_invalid_host_address_setting_is_refused() -> None:
    with pytest.raises(IceConfigError, match="expected IP addresses or interface names"):
        restrict_host_addresses([""])


# --- bounded connectivity checks (hivewire.mesh.ice_timing) -------------------------------------------------

RTO_S = 0.02  # aioice's first retransmission wait, shortened so a silent check fails in 0.3 s here, not 7.5 s


@pytest.fixture
def silent_peer() -> Iterator[socket.socket]:
    """A UDP socket on loopback that takes every datagram and never answers: a pair whose NAT drops all."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((LOOPBACK, 0))
        sink.setblocking(False)
        yield sink


def _received(sink: socket.socket) -> list[bytes]:
    datagrams = []
    with contextlib.suppress(BlockingIOError):
        while True:
            datagrams.append(sink.recv(2048))
    return datagrams


async def _checks_sent_to_a_silent_pair(sink: socket.socket) -> list[aioice.stun.Message]:
    """Run aioice ICE against ``sink`` until it fails; the STUN requests the silent peer received."""
    connection = aioice.Connection(ice_controlling=True, components=1)
    try:
        await connection.gather_candidates()  # host candidates on loopback only (conftest)
        connection.remote_username, connection.remote_password = "peer", "peer-password-of-22-chars"
        host, port = sink.getsockname()
        candidate = aioice.Candidate("1", 1, "udp", 2130706431, host, port, "host")
        await connection.add_remote_candidate(candidate)
        await connection.add_remote_candidate(None)
        with pytest.raises(ConnectionError, match="ICE negotiation failed"):
            await asyncio.wait_for(connection.connect(), 30)
    finally:
        await connection.close()
    return [aioice.stun.parse_message(data) for data in _received(sink)]


@pytest.fixture
def fast_rto(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(aioice.stun, "RETRY_RTO", RTO_S)
    yield
    remove_check_bound()


def test_the_bound_fits_the_pinned_aioice() -> None:
    """constraints.txt pins the aioice the bound was written for; a bump must revisit ice_timing.py."""
    assert aioice.__version__ == PATCHED_AIOICE_VERSION
    assert CHECK_TIMEOUT_S == 7.5
    try:
        assert bound_connectivity_checks() is True
        assert check_bound_active()
        assert bound_connectivity_checks() is True  # idempotent
    finally:
        remove_check_bound()
    assert not check_bound_active()


async def test_a_silent_pair_gets_the_bounded_number_of_checks(fast_rto: None, silent_peer: socket.socket) -> None:
    assert bound_connectivity_checks()
    checks = await _checks_sent_to_a_silent_pair(silent_peer)
    assert [is_connectivity_check(check) for check in checks] == [True] * (1 + CHECK_RETRANSMISSIONS)
    assert len({check.transaction_id for check in checks}) == 1  # one check, retransmitted


async def test_without_the_bound_aioice_retransmits_as_it_always_did(
    fast_rto: None, silent_peer: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aioice.stun, "RETRY_MAX", CHECK_RETRANSMISSIONS + 2)
    remove_check_bound()
    checks = await _checks_sent_to_a_silent_pair(silent_peer)
    assert len(checks) == 1 + CHECK_RETRANSMISSIONS + 2


async def test_other_stun_requests_keep_aioices_retransmissions(
    fast_rto: None, silent_peer: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A STUN query for a server-reflexive address (no ICE role) keeps RETRY_MAX, whatever the bound says."""
    monkeypatch.setattr(aioice.stun, "RETRY_MAX", CHECK_RETRANSMISSIONS + 1)
    assert bound_connectivity_checks()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: aioice.ice.StunProtocol(None),  # type: ignore[arg-type]  # no answer comes to hand to one
        local_addr=(LOOPBACK, 0),
    )
    try:
        request = aioice.stun.Message(aioice.stun.Method.BINDING, aioice.stun.Class.REQUEST)
        with pytest.raises(aioice.stun.TransactionTimeout):
            await protocol.request(request, silent_peer.getsockname())
    finally:
        transport.close()
    assert len(_received(silent_peer)) == 1 + CHECK_RETRANSMISSIONS + 1


def test_an_aioice_it_was_not_written_for_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    remove_check_bound()
    monkeypatch.setattr(aioice, "__version__", "0.14.0")
    assert bound_connectivity_checks() is False
    assert not check_bound_active()
    assert "ICE checks keep aioice's 63.5 s timeout: aioice 0.14.0 is installed" in caplog.text
