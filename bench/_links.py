"""The project's real Links between benchmark processes: which paths exist here, and how a group is wired.

A path names how a pair of peers' bulk payloads travel:

* ``webrtc-untuned``: mesh.Link over a stock aiortc data channel, asyncio event loop;
* ``webrtc-tuned``: the same with ``hivewire.mesh.tuning`` (SCTP adjustments + uvloop) in every process;
* ``direct-tls``: the Link's direct mutual-TLS TCP path (``link.path == "direct-tls"``), data channel kept
  for control.

Offers and answers travel over a multiprocessing pipe per pair (lower rank offers), in place of the
server's signaling; each description is checked to carry candidates on the process's one chosen address
only, so nothing is sent anywhere but loopback or the benchmark's own namespaces.
"""

import asyncio
import importlib
import re
from collections.abc import Callable, Coroutine, Mapping
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from aiortc import RTCPeerConnection, RTCSessionDescription

from hivewire.mesh import FramingLimits, Link, LinkSettings, build_configuration, restrict_host_addresses

PATHS = ("webrtc-untuned", "webrtc-tuned", "direct-tls")
PATH_LABELS = {"webrtc-untuned": "webrtc untuned", "webrtc-tuned": "webrtc tuned", "direct-tls": "direct TLS"}
SETUP_TIMEOUT_S = 60.0
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
        if "path" not in dir(Link):
            return "n/a (not built)"
        return None
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")


def runner(path: str) -> Callable[[Coroutine[Any, Any, _T]], _T]:
    """Prepare this (fresh) process for ``path`` and return how to run its event loop.

    Tuning is process-wide while active, so each path runs in processes of its own.
    """
    if path == "webrtc-tuned":
        tuning = importlib.import_module("hivewire.mesh.tuning")
        if not tuning.apply_sctp_tuning():
            raise RuntimeError("SCTP tuning refused to apply in a benchmark process")
        run: Callable[[Coroutine[Any, Any, _T]], _T] = tuning.run
        return run
    return asyncio.run


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


async def open_links(rank: int, pipes: Mapping[int, Connection], *, host: str, path: str) -> dict[str, Link]:
    """Open a Link to every other rank (``pipes``: rank -> this pair's signaling pipe) on ``path``.

    Host candidates are restricted to ``host`` (127.0.0.1, or the namespace's address) for the process.
    """
    restrict_host_addresses([host])
    links: dict[str, Link] = {}
    try:
        pending = []
        for other, conn in sorted(pipes.items()):
            pc = RTCPeerConnection(build_configuration([]))
            link = Link(pc, peer=f"peer{other}", settings=LINK_SETTINGS)
            links[link.peer] = link
            pending.append(_negotiate(pc, conn, offer=rank < other, host=host))
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            await asyncio.gather(*pending)
            await asyncio.gather(*(link.wait_open() for link in links.values()))
        want = "direct-tls" if path == "direct-tls" else None
        for link in links.values():
            got = getattr(link, "path", None)
            if (want is not None and got != want) or (want is None and got == "direct-tls"):
                raise RuntimeError(f"link to {link.peer} is on path {got!r}, the benchmark asked for {path}")
    except BaseException:
        await close_links(links)
        raise
    return links


async def close_links(links: Mapping[str, Link]) -> None:
    await asyncio.gather(*(link.close() for link in links.values()), return_exceptions=True)
