"""What a peer can find out about its own network: candidates, NAT mapping, TURN, the selected pair, ICE failures.

`hivewire doctor` runs these probes against the ICE servers of a join; the NAT lab (tests/netlab) uses them
to check its namespaces and to explain failed connections. Nothing here knows about servers, runs or
namespaces: each probe takes ICE server URLs and credentials and reports what the network did.
"""

import asyncio
import contextlib
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aioice.stun
import aioice.turn
from aioice import stun
from aiortc import RTCPeerConnection, RTCSctpTransport
from aiortc.rtcicetransport import parse_stun_turn_uri

from hivewire.mesh import build_configuration

__all__ = [
    "STUN_RETRANSMISSIONS",
    "UDP_BLOCKED",
    "MappingBehaviour",
    "TurnServer",
    "candidate_types",
    "explain_ice_failure",
    "gather_local_description",
    "mapping_behaviour",
    "nominated_pair",
    "selected_pair",
    "stun_endpoints",
    "stun_mapped_addresses",
    "stun_retransmissions",
    "turn_allocation",
    "turn_servers",
]

UDP_BLOCKED = "UDP blocked: no candidate pair succeeded; TURN over TCP/TLS needed"
STUN_RETRANSMISSIONS = 3  # 0.5 + 1 + 2 + 4 s: 7.5 s until a STUN server counts as unreachable
TURN_CLOSE_TIMEOUT_S = 2.0  # deleting the allocation after the probe; coturn expires it anyway
_CANDIDATE_TYPE = re.compile(r"^a=candidate:.* typ (host|srflx|prflx|relay)\b", re.MULTILINE)


class MappingBehaviour(StrEnum):
    """RFC 4787 mapping behaviour as seen from two destinations (same server address, two ports)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"  # "cone": a server-reflexive candidate works for any peer
    ENDPOINT_DEPENDENT = "endpoint-dependent"  # "symmetric": only a TURN relay gets through


@dataclass(frozen=True)
class TurnServer:
    """One TURN URL of a join's ICE servers, parsed, with the credentials that came with it."""

    url: str
    host: str
    port: int
    transport: str  # "udp" or "tcp"
    tls: bool  # turns:
    username: str | None
    credential: str | None


@contextlib.contextmanager
def stun_retransmissions(count: int) -> Iterator[None]:
    """Lower aioice's STUN retransmissions (default 6: 63.5 s per transaction) while the block runs.

    aioice reads the module-level ``RETRY_MAX`` when a transaction starts and has no per-connection option,
    so TURN allocations and ICE checks started inside the block give up after ``count`` retransmissions.
    Process-wide while it lasts: use it around a diagnosis, not around a mesh that other code shares.
    """
    previous = aioice.stun.RETRY_MAX
    aioice.stun.RETRY_MAX = count
    try:
        yield
    finally:
        aioice.stun.RETRY_MAX = previous


class _StunClient(asyncio.DatagramProtocol):
    """One UDP socket that runs aioice STUN transactions (aioice's own protocol needs an ICE connection)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.transactions: dict[bytes, stun.Transaction] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            message = stun.parse_message(data)
        except ValueError:
            return  # not STUN: nothing else is expected on this socket
        transaction = self.transactions.get(message.transaction_id)
        if transaction is not None:
            transaction.response_received(message, addr)

    def send_stun(self, message: stun.Message, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(bytes(message), addr)


async def stun_mapped_addresses(
    servers: Sequence[tuple[str, int]], *, retransmissions: int = STUN_RETRANSMISSIONS
) -> list[tuple[str, int]]:
    """Send a Binding request to each server from one UDP socket; return the mapped address each saw.

    One socket matters: the NAT's mapping behaviour is whether the same local port gets the same public
    port towards different destinations. Raises aioice's TransactionTimeout when a server does not answer.
    """
    loop = asyncio.get_running_loop()
    # Any address: the kernel picks the source by route, as it would for the host candidate on that route.
    any_address = ("0.0.0.0", 0)  # noqa: S104
    transport, client = await loop.create_datagram_endpoint(_StunClient, local_addr=any_address)
    try:
        mapped = []
        for server in servers:
            request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
            transaction = stun.Transaction(request, server, client, retransmissions=retransmissions)
            client.transactions[request.transaction_id] = transaction
            response, _ = await transaction.run()
            host, port = response.attributes["XOR-MAPPED-ADDRESS"]
            mapped.append((host, port))
        return mapped
    finally:
        transport.close()


def mapping_behaviour(mapped: Sequence[tuple[str, int]]) -> MappingBehaviour:
    """Classify the NAT from the addresses :func:`stun_mapped_addresses` returned for one socket."""
    if len(mapped) < 2:
        raise ValueError(f"need mapped addresses from two destinations, got {list(mapped)}")
    if len(set(mapped)) == 1:
        return MappingBehaviour.ENDPOINT_INDEPENDENT
    return MappingBehaviour.ENDPOINT_DEPENDENT


async def stun_endpoints(ice_servers: Sequence[Mapping[str, Any]]) -> list[tuple[str, int]]:
    """Distinct IPv4 UDP addresses that answer STUN Binding requests: stun: URLs, then turn: over UDP.

    A TURN server is a STUN server too (RFC 8656), so its port is a second destination for the mapping
    check when the run names a single STUN URL. Names are resolved here because sendto() needs addresses;
    a name that does not resolve raises socket.gaierror.
    """
    loop = asyncio.get_running_loop()
    found: list[tuple[str, int]] = []
    stun_urls = [url for url in _all_urls(ice_servers) if url.startswith("stun:")]
    turn_urls = [server.url for server in turn_servers(ice_servers) if server.transport == "udp" and not server.tls]
    for url in [*stun_urls, *turn_urls]:
        parsed = parse_stun_turn_uri(url)
        infos = await loop.getaddrinfo(parsed["host"], parsed["port"], family=socket.AF_INET, type=socket.SOCK_DGRAM)
        address = (str(infos[0][4][0]), int(infos[0][4][1]))
        if address not in found:
            found.append(address)
    return found


def turn_servers(ice_servers: Sequence[Mapping[str, Any]]) -> list[TurnServer]:
    """Every turn: and turns: URL of the ICE servers with its credentials, in the order given."""
    found = []
    for server in ice_servers:
        for url in _urls(server):
            if not url.startswith(("turn:", "turns:")):
                continue
            parsed = parse_stun_turn_uri(url)
            found.append(
                TurnServer(
                    url=url,
                    host=parsed["host"],
                    port=parsed["port"],
                    transport=parsed["transport"],
                    tls=parsed["scheme"] == "turns",
                    username=server.get("username"),
                    credential=server.get("credential"),
                )
            )
    return found


class _Discard(asyncio.DatagramProtocol):
    """The relayed endpoint's protocol for a probe: nothing is sent, so nothing is expected; tells when closed."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def turn_allocation(server: TurnServer) -> tuple[str, int]:
    """Allocate a relay on ``server`` with its credentials, delete the allocation, return the relayed address.

    Raises aioice's TransactionFailed (the server answered an error, e.g. 401 for refused credentials),
    TransactionTimeout (no answer: UDP blocked or the server is down) or OSError (TCP/TLS connection refused).
    """
    relay, protocol = await aioice.turn.create_turn_endpoint(
        _Discard,
        server_addr=(server.host, server.port),
        username=server.username,
        password=server.credential,
        ssl=server.tls,
        transport=server.transport,
    )
    try:
        host, port = relay.get_extra_info("sockname")
        return str(host), int(port)
    finally:
        relay.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(protocol.closed, TURN_CLOSE_TIMEOUT_S)


async def gather_local_description(ice_servers: Sequence[Mapping[str, Any]]) -> str:
    """Gather candidates with these ICE servers (policy all) and return the offer SDP that carries them.

    aiortc gathers inside setLocalDescription (no trickle); aioice bounds each server query to 5 s.
    """
    pc = RTCPeerConnection(build_configuration(ice_servers))
    try:
        pc.createDataChannel("diagnostics")  # an offer without media or data has no ICE candidates
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)
    finally:
        await pc.close()


def candidate_types(sdp: str) -> set[str]:
    """The candidate types (host, srflx, relay) offered in a session description."""
    return set(_CANDIDATE_TYPE.findall(sdp))


def selected_pair(pc: RTCPeerConnection) -> dict[str, Any]:
    """The nominated candidate pair of a connected peer connection: types and addresses of both ends.

    aiortc does not expose the selected pair (no getStats candidate-pair entries), so this reads aioice's
    nominated pair through private attributes; tests/netlab fails loudly if they move.
    """
    if pc.sctp is None:
        raise RuntimeError("no SCTP transport: the connection has no data channels or is not negotiated")
    return nominated_pair(pc.sctp)


def nominated_pair(sctp: RTCSctpTransport) -> dict[str, Any]:
    """:func:`selected_pair` from the SCTP transport under a data channel (``channel.transport``).

    For code that holds a channel but not its peer connection, such as a mesh Link.
    """
    connection = sctp.transport.transport._connection
    nominated = connection._nominated
    if not nominated:
        raise RuntimeError("ICE has no nominated pair (not connected?)")
    pair = nominated[min(nominated)]
    local, remote = pair.local_candidate, pair.remote_candidate
    return {
        "local": local.type,
        "remote": remote.type,
        "local_address": f"{local.host}:{local.port}",
        "remote_address": f"{remote.host}:{remote.port}",
    }


def explain_ice_failure(gathered: set[str], ice_servers: Sequence[Mapping[str, Any]], *, relay_only: bool) -> str:
    """Say why no candidate pair succeeded, from the local candidate types and the configured servers.

    A STUN server that gives no server-reflexive candidate and a TURN server that gives no relay candidate
    mean UDP does not leave this network: only TURN over TCP/TLS could help.
    """
    urls = _all_urls(ice_servers)
    has_stun = any(url.startswith("stun:") for url in urls)
    has_turn = any(url.startswith(("turn:", "turns:")) for url in urls)
    if "relay" in gathered and relay_only:
        return (
            "no candidate pair succeeded although the TURN relay gave us a candidate: "
            "the other peer reached neither us nor the relay (its UDP may be blocked)"
        )
    if "relay" in gathered:
        return (
            "no candidate pair succeeded with policy all although the TURN relay gave us a candidate; "
            "retry relay-only (aioice's TURN with policy all fails behind two symmetric NATs)"
        )
    if (has_stun or has_turn) and "srflx" not in gathered:
        return UDP_BLOCKED
    if has_turn:
        return (
            "no candidate pair succeeded and the TURN server gave no relay candidate (credentials refused or "
            "TURN unreachable); behind a symmetric NAT only a relay gets through"
        )
    return "no candidate pair succeeded and no TURN server is configured; a symmetric NAT needs a TURN relay"


def _urls(server: Mapping[str, Any]) -> list[str]:
    urls = server.get("urls", [])
    return [urls] if isinstance(urls, str) else list(urls)


def _all_urls(ice_servers: Sequence[Mapping[str, Any]]) -> list[str]:
    return [url for server in ice_servers for url in _urls(server)]
