"""How averaging moves bytes between group members: an interface and its two implementations.

``GroupTransport`` is all the butterfly needs: send one message to a member, receive the next message
from a member within a deadline. ``LinkGroupTransport`` runs it over the mesh's Links (bulk channel, one
payload per message); ``InProcessHub`` runs a whole group in one event loop over asyncio queues, for tests
and for trying strategies without a network.
"""

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from hivewire.averaging.errors import PeerUnreachable
from hivewire.mesh import Link, LinkError


class GroupTransport(Protocol):
    """Message transport among the members of one averaging group; messages arrive whole and in order."""

    async def send(self, peer: str, data: bytes | bytearray | memoryview) -> None:
        """Send one message to ``peer`` (left unchanged by the caller until the round ends); PeerUnreachable
        when it cannot be reached any more."""
        ...

    async def recv(self, peer: str, *, timeout_s: float) -> bytes | bytearray | memoryview:
        """The next message from ``peer``; TimeoutError after ``timeout_s``, PeerUnreachable once it is gone."""
        ...


class LinkGroupTransport:
    """A GroupTransport over open mesh Links, messages as bulk payloads; one Link per other member, or several.

    With several Links to a member (stripes: separate WebRTC connections, each with its own SCTP window and
    congestion control), message i to it goes over stripe i mod n and the receiver reads message i from the
    same stripe, so messages still arrive in order; both sides must list the same Links in the same order.
    The butterfly must be the only reader of these links' bulk channels while a round runs: payloads are
    not tagged by consumer. Framing bounds what a peer can make us allocate (``FramingLimits``); the
    butterfly checks every message's size and content after that.
    """

    def __init__(self, links: Mapping[str, Link | Sequence[Link]]) -> None:
        self._links = {peer: (link,) if isinstance(link, Link) else tuple(link) for peer, link in links.items()}
        if not all(self._links.values()):
            raise ValueError("every member needs at least one link")
        self._sent = dict.fromkeys(self._links, 0)
        self._received = dict.fromkeys(self._links, 0)

    def _stripes(self, peer: str) -> tuple[Link, ...]:
        try:
            return self._links[peer]
        except KeyError:
            raise PeerUnreachable(f"no link to group member {peer}; links to: {sorted(self._links)}") from None

    async def send(self, peer: str, data: bytes | bytearray | memoryview) -> None:
        stripes = self._stripes(peer)
        link = stripes[self._sent[peer] % len(stripes)]
        self._sent[peer] += 1
        try:
            await link.send_payload(data, borrow=True)  # messages are never changed once sent
        except LinkError as exc:
            raise PeerUnreachable(str(exc)) from exc

    async def recv(self, peer: str, *, timeout_s: float) -> bytes | bytearray | memoryview:
        stripes = self._stripes(peer)
        link = stripes[self._received[peer] % len(stripes)]
        try:
            async with asyncio.timeout(timeout_s):
                _, data = await link.recv_payload()
        except LinkError as exc:
            raise PeerUnreachable(str(exc)) from exc
        self._received[peer] += 1
        return data


_GONE: Any = object()


class InProcessHub:
    """A group's message queues in one event loop: ``transport(member)`` is that member's view.

    ``close(member)`` plays a member dying: whatever it had sent still arrives (as over a real ordered link
    that delivered it), then everyone's receive from it fails with PeerUnreachable, and so do its sends.
    """

    def __init__(self, members: Iterable[str]) -> None:
        self.members = tuple(members)
        self._queues: dict[tuple[str, str], asyncio.Queue[Any]] = {
            (src, dst): asyncio.Queue() for src in self.members for dst in self.members if src != dst
        }
        self._gone: set[str] = set()

    def transport(self, member: str) -> "InProcessTransport":
        if member not in self.members:
            raise ValueError(f"{member} is not in the hub's group {self.members}")
        return InProcessTransport(self, member)

    def close(self, member: str) -> None:
        """Make ``member`` unreachable in both directions, as if its process died."""
        if member in self._gone:
            return
        self._gone.add(member)
        for (src, dst), queue in self._queues.items():
            if member in (src, dst):
                queue.put_nowait(_GONE)

    def _queue(self, src: str, dst: str) -> "asyncio.Queue[Any]":
        if src in self._gone or dst in self._gone:
            raise PeerUnreachable(f"{dst if dst in self._gone else src} is gone")
        try:
            return self._queues[(src, dst)]
        except KeyError:
            raise PeerUnreachable(f"{dst} is not a member of this hub's group {self.members}") from None


class InProcessTransport:
    """One member's GroupTransport over an InProcessHub."""

    def __init__(self, hub: InProcessHub, me: str) -> None:
        self._hub = hub
        self.me = me

    async def send(self, peer: str, data: bytes | bytearray | memoryview) -> None:
        self._hub._queue(self.me, peer).put_nowait(bytes(data))

    async def recv(self, peer: str, *, timeout_s: float) -> bytes | bytearray | memoryview:
        queue = self._hub._queues.get((peer, self.me))
        if queue is None:
            raise PeerUnreachable(f"{peer} is not a member of this hub's group {self._hub.members}")
        async with asyncio.timeout(timeout_s):
            item = await queue.get()
        if item is _GONE:
            queue.put_nowait(_GONE)
            raise PeerUnreachable(f"{peer if peer in self._hub._gone else self.me} is gone")
        return item

    def close(self) -> None:
        """This member dies (see InProcessHub.close)."""
        self._hub.close(self.me)
