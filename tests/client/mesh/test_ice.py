"""ICE configuration proves: ICE servers are always explicit and checked, relay policy uses the enum, and
host candidates come only from the configured addresses."""

import re

import pytest
from aiortc import RTCIceTransportPolicy, RTCPeerConnection

from hivewire.mesh import IceConfigError, build_configuration, restrict_host_addresses

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
