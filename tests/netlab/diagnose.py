"""What a peer can find out about its own network: NAT mapping behaviour, the selected pair, why ICE failed.

Written for the NAT lab, meant to be lifted into ``hivewire doctor``: nothing here knows about namespaces.
Run ``python -m tests.netlab.diagnose HOST:PORT HOST:PORT`` to print the mapping check as JSON.
"""

import argparse
import asyncio
import json
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from aioice import stun
from aiortc import RTCPeerConnection

UDP_BLOCKED = "UDP blocked: no candidate pair succeeded; TURN over TCP/TLS needed"
STUN_RETRANSMISSIONS = 3  # 0.5 + 1 + 2 + 4 s: 7.5 s until a STUN server counts as unreachable
_CANDIDATE_TYPE = re.compile(r"^a=candidate:.* typ (host|srflx|prflx|relay)\b", re.MULTILINE)


class MappingBehaviour(StrEnum):
    """RFC 4787 mapping behaviour as seen from two destinations (same server address, two ports)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"  # "cone": a server-reflexive candidate works for any peer
    ENDPOINT_DEPENDENT = "endpoint-dependent"  # "symmetric": only a TURN relay gets through


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
    connection = pc.sctp.transport.transport._connection
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
    urls = [url for server in ice_servers for url in _urls(server)]
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


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    """Print the mapped addresses seen by each server and the mapping behaviour they imply, as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("servers", nargs="+", type=_address, help="STUN servers as HOST:PORT (two or more)")
    args = parser.parse_args()
    mapped = asyncio.run(stun_mapped_addresses(args.servers))
    print(json.dumps({"mapped": mapped, "behaviour": mapping_behaviour(mapped)}))


if __name__ == "__main__":
    main()
