"""What coordination needs from the mesh: send a control record to a neighbour, hear records, open a link.

The mesh manager satisfies ``GossipTransport`` (it owns the links and their control channels); tests run
whole swarms in one event loop with an in-process implementation. Records reach handlers after the link's
codec accepted them (``COORDINATION_SCHEMAS`` registered), and are checked again by their consumer.
"""

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

# Called with (neighbour that sent it, record); must not block: consumers queue work for their own tasks.
RecordHandler = Callable[[str, dict[str, Any]], None]


class GossipTransport(Protocol):
    """Control records to and from this peer's neighbours."""

    @property
    def peer_id(self) -> str:
        """This peer's id."""
        ...

    @property
    def neighbours(self) -> list[str]:
        """Peers we hold an open link to now."""
        ...

    def send_control(self, peer: str, record: Mapping[str, Any]) -> None:
        """Send one record to neighbour ``peer``; a MeshError (LinkError) when there is no open link to it."""
        ...

    def on_records(self, types: Collection[str], handler: RecordHandler) -> None:
        """Deliver every record of these types, from any neighbour, to ``handler``."""
        ...

    async def connect(self, peer: str) -> Any:
        """Open a direct link to ``peer`` (a no-op when it is a neighbour); a MeshError when that fails."""
        ...


LINK_THROUGHPUT_ATTRIBUTE = "throughput_bytes_per_s"  # a mesh Link's recent payload rate, None before any


def measured_throughput(transport: GossipTransport) -> float:
    """The best recent payload rate among our links, in bytes/s; 0.0 when unknown.

    Read from the links of a transport that has them (the mesh manager's ``link(peer)``). A Link measures its
    rate while payloads flow, so one link that moved a state download alone shows what this peer's
    connection can carry; a sum over links would count that capacity once per neighbour. A transport without
    links, a link that has not measured yet, or a value that is not a finite number > 0 counts as nothing,
    so a peer that cannot tell gets an average part (matchmaking.part_weights), never none.
    """
    link_of = getattr(transport, "link", None)
    if not callable(link_of):
        return 0.0
    best = 0.0
    for peer in transport.neighbours:
        value = getattr(link_of(peer), LINK_THROUGHPUT_ATTRIBUTE, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            best = max(best, float(value))
    return best
