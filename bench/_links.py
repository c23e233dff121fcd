"""The project's real Links between benchmark processes: which paths exist here, and how a group is wired.

A path names how a pair of peers' bulk payloads travel:

* ``webrtc-untuned``: mesh.Link over a stock aiortc data channel, asyncio event loop;
* ``webrtc-tuned``: the same with ``hivewire.mesh.tuning`` (SCTP adjustments + uvloop) in every process;
* ``direct-tls``: the Link's direct mutual-TLS TCP path (``link.path == "direct-tls"``), data channel kept
  for control; tuned as above where tuning is built, as the network process runs it.

Offers and answers travel over a multiprocessing pipe per pair (lower rank offers), in place of the
server's signaling; each description is checked to carry candidates on the process's one chosen address
only, so nothing is sent anywhere but loopback or the benchmark's own namespaces.
"""

import asyncio
import contextlib
import importlib
import os
import re
from collections.abc import Callable, Coroutine, Mapping
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from aiortc import RTCPeerConnection, RTCSessionDescription

from hivewire.mesh import FramingLimits, Link, LinkSettings, build_configuration, restrict_host_addresses

PATHS = ("webrtc-untuned", "webrtc-tuned", "direct-tls")
PATH_LABELS = {"webrtc-untuned": "webrtc untuned", "webrtc-tuned": "webrtc tuned", "direct-tls": "direct TLS"}
SETUP_TIMEOUT_S = 60.0
PATH_UP_TIMEOUT_S = 10.0  # after both channels opened, until every link carries bulk on the path asked for
# A butterfly message is at most one part (half the tensor for 2 peers) plus a small header.
LINK_SETTINGS = LinkSettings(framing=FramingLimits(max_payload_bytes=2**30))
_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ", re.MULTILINE)

_T = TypeVar("_T")


def unavailable(path: str) -> str | None:
    """Why ``path`` cannot be measured with the installed client, or None when it can."""
    if path == "webrtc-untuned":
        return None
    if path == "webrtc-tuned":
        try:
            tuning = importlib.import_module("hivewire.mesh.tuning")
        except ImportError:
            return "n/a (not built)"
        if not all(hasattr(tuning, name) for name in ("apply_sctp_tuning", "remove_sctp_tuning", "run")):
            return "n/a (tuning module lacks apply_sctp_tuning/run)"
        if not tuning.apply_sctp_tuning():
            return "n/a (tuning refused: see its warning)"
        tuning.remove_sctp_tuning()
        return None
    if path == "direct-tls":
        try:
            direct = importlib.import_module("hivewire.mesh.direct")
        except ImportError:
            return "n/a (not built)"
        if not all(hasattr(direct, name) for name in ("DirectEndpoint", "DirectSettings")):
            return "n/a (mesh.direct lacks DirectEndpoint/DirectSettings)"
        return None
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


def runner(path: str) -> Callable[[Coroutine[Any, Any, _T]], _T]:
    """Prepare this (fresh) process for ``path`` and return how to run its event loop.

    Tuning is process-wide while active, so each path runs in processes of its own. The direct path runs
    as the network process will, tuned where tuning is built (its control channel is WebRTC).
    """
    tuned = path == "webrtc-tuned" or (path == "direct-tls" and unavailable("webrtc-tuned") is None)
    if not tuned:
        os.environ["HIVEWIRE_SCTP_TUNING"] = "off"  # tuning's documented off switch, should anything apply it
        with contextlib.suppress(ImportError):
            tuning = importlib.import_module("hivewire.mesh.tuning")
            tuning.remove_sctp_tuning()
        return asyncio.run
    tuning = importlib.import_module("hivewire.mesh.tuning")
    if not tuning.apply_sctp_tuning():
        raise RuntimeError("SCTP tuning refused to apply in a benchmark process")
    run: Callable[[Coroutine[Any, Any, _T]], _T] = tuning.run
    return run


def _checked(description: RTCSessionDescription | None, host: str) -> tuple[str, str]:
    """The description as (sdp, type) after checking its candidates are all on ``host``."""
    if description is None:
        raise RuntimeError("no local description after setLocalDescription")
    addresses = set(_CANDIDATE.findall(description.sdp))
    if addresses != {host}:
        raise RuntimeError(f"candidates on {sorted(addresses)}, expected only {host}: refusing to send them")
    return description.sdp, description.type


async def _negotiate(pc: RTCPeerConnection, conn: Connection, *, offer: bool, host: str) -> None:
    if offer:
        await pc.setLocalDescription(await pc.createOffer())
        conn.send(_checked(pc.localDescription, host))
        sdp, kind = await asyncio.to_thread(conn.recv)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
    else:
        sdp, kind = await asyncio.to_thread(conn.recv)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        await pc.setLocalDescription(await pc.createAnswer())
        conn.send(_checked(pc.localDescription, host))


class LinkGroup:
    """This process's open Links to the other ranks, and the direct-path listener when the path uses one."""

    def __init__(self) -> None:
        self.stripes: dict[str, list[Link]] = {}  # peer -> its Links, in the order both sides opened them
        self.endpoint: Any = None  # hivewire.mesh.direct.DirectEndpoint on the direct-tls path

    @property
    def links(self) -> dict[str, Link]:
        """The first Link to each peer (the only one unless striped)."""
        return {peer: links[0] for peer, links in self.stripes.items()}

    def all_links(self) -> list[Link]:
        return [link for links in self.stripes.values() for link in links]

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.all_links()), return_exceptions=True)
        if self.endpoint is not None:
            await self.endpoint.close()


async def open_links(
    rank: int, pipes: Mapping[int, Connection], *, host: str, path: str, stripes: int = 1
) -> LinkGroup:
    """Open ``stripes`` Links to every other rank (``pipes``: rank -> this pair's signaling pipe) on ``path``.

    Host candidates (and the direct path's listener) are restricted to ``host`` (127.0.0.1, or the
    namespace's address). Returns once every link carries bulk payloads on the path asked for.
    """
    restrict_host_addresses([host])
    group = LinkGroup()

    async def pair(other: int, conn: Connection) -> None:
        for _ in range(stripes):  # one negotiation at a time on the pair's pipe, in the same order on both sides
            pc = RTCPeerConnection(build_configuration([]))
            extra = {"direct": group.endpoint} if group.endpoint is not None else {}
            link = Link(pc, peer=f"peer{other}", settings=LINK_SETTINGS, **extra)
            group.stripes.setdefault(link.peer, []).append(link)
            await _negotiate(pc, conn, offer=rank < other, host=host)

    try:
        if path == "direct-tls":
            direct = importlib.import_module("hivewire.mesh.direct")
            group.endpoint = direct.DirectEndpoint(direct.DirectSettings(listen_addresses=(host,)))
            await group.endpoint.start()
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            await asyncio.gather(*(pair(other, conn) for other, conn in sorted(pipes.items())))
            await asyncio.gather(*(link.wait_open() for link in group.all_links()))
        if path == "direct-tls":
            await _wait_direct(group)
        elif any(getattr(link, "path", "webrtc") != "webrtc" for link in group.all_links()):
            raise RuntimeError(f"links left WebRTC for {[link.path for link in group.all_links()]}")
    except BaseException:
        await group.close()
        raise
    return group


class PathNotUp(RuntimeError):
    """The direct path did not come up on every link in time; the caller may build the group again."""


async def _wait_direct(group: LinkGroup) -> None:
    """Wait until every link sends bulk over direct TLS; PathNotUp with each link's state when not in time."""
    try:
        async with asyncio.timeout(PATH_UP_TIMEOUT_S):
            while any(link.path != "direct-tls" for link in group.all_links()):
                failed = [link for link in group.all_links() if link.direct_state in ("off", "refused")]
                if failed:
                    break
                await asyncio.sleep(0.01)  # the direct handshake reports no event to wait on
            else:
                return
    except TimeoutError:
        pass
    states = {link.peer: link.direct_state for link in group.all_links()}
    raise PathNotUp(f"direct TLS path not up on every link after {PATH_UP_TIMEOUT_S} s: {states}")


def check_still_on_path(group: LinkGroup, path: str) -> None:
    """After the rounds: a direct-tls row whose payloads fell back to WebRTC would time the wrong path."""
    if path != "direct-tls":
        return
    for link in group.all_links():
        stats = link.stats
        if link.path != "direct-tls" or stats.payloads_sent_direct != stats.payloads_sent:
            raise RuntimeError(
                f"link to {link.peer} left the direct path during the rounds: now {link.path}, "
                f"{stats.payloads_sent_direct} of {stats.payloads_sent} payloads sent direct"
            )
