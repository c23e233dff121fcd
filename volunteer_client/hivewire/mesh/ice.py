"""ICE configuration: explicit ICE servers and a restriction of host candidates to chosen addresses.

Two aiortc/aioice defaults are unacceptable here (shared/notes/webrtc-field-notes.md):

* ``RTCConfiguration()`` without ``iceServers`` asks a public Google STUN server. We always pass the list
  the run's server handed out, ``[]`` included.
* aioice gathers a host candidate on every address of the machine except 127.0.0.1. A volunteer may want
  to keep some interfaces (VPN, work LAN) out of the mesh, and tests must only ever use loopback. aioice has
  no option for it, so :func:`restrict_host_addresses` replaces its module-level address lookup.
"""

import inspect
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aioice
import aioice.ice
import ifaddr
from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy
from aiortc.rtcicetransport import parse_stun_turn_uri

from hivewire.mesh.errors import IceConfigError

logger = logging.getLogger(__name__)

# aioice versions whose gather_candidates() was read and found to call the module-level
# get_host_addresses(use_ipv4, use_ipv6) for its host candidates. Other versions get a warning.
TESTED_AIOICE_VERSIONS = ("0.13",)
_ICE_SERVER_KEYS = frozenset({"urls", "username", "credential"})
_URL_SCHEMES = ("stun:", "turn:", "turns:")
_aioice_get_host_addresses = aioice.ice.get_host_addresses


def build_configuration(ice_servers: Sequence[Mapping[str, Any]], *, relay_only: bool = False) -> RTCConfiguration:
    """Build an RTCConfiguration from ICE server dicts as the join response carries them.

    The list is always explicit (``[]`` means host candidates only), so aiortc never falls back to its
    public default. ``relay_only`` forces TURN, the fallback when direct ICE fails behind symmetric NATs.
    """
    servers = [_ice_server(entry, index) for index, entry in enumerate(ice_servers)]
    urls = [url for server in servers for url in server.urls]
    for scheme in ("stun", "turn"):
        used = [url for url in urls if url.startswith(scheme)]
        if len(used) > 1:
            logger.info("aiortc uses only the first %s URL: %s; ignoring %s", scheme, used[0], used[1:])
    if relay_only and not any(url.startswith("turn") for url in urls):
        raise IceConfigError("relay_only needs a TURN server, but none of the ICE servers is turn: or turns:")
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


def _ice_server(entry: Mapping[str, Any], index: int) -> RTCIceServer:
    """Check one ICE server dict (it comes over the network from the run's server) and convert it."""
    if not isinstance(entry, Mapping):
        raise IceConfigError(f"ice_servers[{index}]: expected a mapping, got {type(entry).__name__}")
    unknown = set(entry) - _ICE_SERVER_KEYS
    if unknown:
        raise IceConfigError(f"ice_servers[{index}]: unknown keys {sorted(unknown)}")
    urls = entry.get("urls")
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
        raise IceConfigError(f"ice_servers[{index}].urls: expected a non-empty list of strings, got {urls!r}")
    for url in urls:
        if not url.startswith(_URL_SCHEMES):
            raise IceConfigError(f"ice_servers[{index}]: {url!r} is not a stun:, turn: or turns: URL")
        try:
            parse_stun_turn_uri(url)
        except ValueError as exc:
            raise IceConfigError(f"ice_servers[{index}]: malformed URL {url!r}") from exc
    username, credential = entry.get("username"), entry.get("credential")
    for name, value in (("username", username), ("credential", credential)):
        if value is not None and not isinstance(value, str):
            raise IceConfigError(f"ice_servers[{index}].{name}: expected a string, got {type(value).__name__}")
    return RTCIceServer(urls=list(urls), username=username, credential=credential)


def restrict_host_addresses(addresses: Sequence[str] | None) -> None:
    """Make aioice gather host candidates only on ``addresses`` (IP literals or interface names).

    Process-wide: the mesh runs in its own network process, and aioice offers no per-connection option.
    ``None`` restores aioice's own lookup (every address but 127.0.0.1). Interface names are resolved at
    each gathering, so an interface that comes up later is picked up. Raises IceConfigError when this
    aioice no longer looks addresses up the way the hook expects, instead of silently gathering all.
    """
    _check_aioice()
    if addresses is None:
        aioice.ice.get_host_addresses = _aioice_get_host_addresses
        logger.info("host candidates: every address of this machine (aioice default)")
        return
    chosen = list(addresses)
    for entry in chosen:
        if not isinstance(entry, str) or not entry:
            raise IceConfigError(f"host addresses: expected IP addresses or interface names, got {entry!r}")

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        """Replacement for aioice.ice.get_host_addresses limited to the configured addresses."""
        found = [
            ip
            for ip in _resolve(chosen)
            if (use_ipv4 and ipaddress.ip_address(ip).version == 4)
            or (use_ipv6 and ipaddress.ip_address(ip).version == 6)
        ]
        if not found:
            logger.warning("host candidates: none of %s has an address; only relayed candidates remain", chosen)
        return found

    aioice.ice.get_host_addresses = get_host_addresses
    logger.info("host candidates restricted to %s", chosen)


def _resolve(entries: Sequence[str]) -> list[str]:
    """Turn IP literals and interface names into addresses, in the order given."""
    adapters = {adapter.nice_name: adapter for adapter in ifaddr.get_adapters()}
    found: list[str] = []
    for entry in entries:
        try:
            found.append(str(ipaddress.ip_address(entry)))
            continue
        except ValueError:
            pass
        adapter = adapters.get(entry)
        if adapter is None:
            logger.warning("host candidates: no interface or address named %r on this machine", entry)
            continue
        for ip in adapter.ips:
            # ifaddr gives IPv6 as (address, flowinfo, scope_id); link-local (scope_id != 0) needs a
            # scope in every packet, which aioice does not carry, so it leaves those out as well.
            if isinstance(ip.ip, str):
                found.append(ip.ip)
            elif ip.ip[2] == 0:
                found.append(ip.ip[0])
    return found


def _check_aioice() -> None:
    """Refuse to patch an aioice whose address lookup no longer has the shape the hook replaces."""
    original = inspect.signature(_aioice_get_host_addresses)
    if list(original.parameters) != ["use_ipv4", "use_ipv6"]:
        raise IceConfigError(
            f"aioice {aioice.__version__}: get_host_addresses{original} changed; "
            "hivewire.mesh.ice.restrict_host_addresses must be updated for it"
        )
    if "get_host_addresses(" not in inspect.getsource(aioice.ice.Connection.gather_candidates):
        raise IceConfigError(
            f"aioice {aioice.__version__}: gather_candidates() no longer calls get_host_addresses(); "
            "hivewire.mesh.ice.restrict_host_addresses must be updated for it"
        )
    if not aioice.__version__.startswith(TESTED_AIOICE_VERSIONS):
        logger.warning(
            "aioice %s is untested with the host-address restriction (tested: %s); check that only "
            "the configured addresses appear in local candidates",
            aioice.__version__,
            ", ".join(TESTED_AIOICE_VERSIONS),
        )
