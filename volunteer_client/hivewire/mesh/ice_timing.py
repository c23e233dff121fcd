"""Bounded ICE connectivity checks: a check that hears nothing fails after ``CHECK_TIMEOUT_S``, not 63.5 s.

aioice retransmits every connectivity check ``aioice.stun.RETRY_MAX`` (6) times, the wait doubling from
0.5 s, so a pair that never answers fails after 63.5 s, and ICE reports failure only once every pair has
failed. An attempt that cannot succeed thus held the link until its ``open_timeout_s`` (30 s), and only then
did the offerer retry relay-only. That is the case between two symmetric NATs in the NAT lab: coturn drops
an allocation as soon as it fails to send to a peer address it cannot route (the relay's first check goes
to the peer's private host candidate: "wrote to peer -1 bytes"), every later request on it gets
``438 Wrong nonce`` then ``400 Bad Request`` (the sequence in shared/notes pitfall 7), and every pair through
either relay is dead from the first 50 ms on. Measured (docs/decisions.md, "ICE check timeouts"): start to
open link 30.6 s before (64 s without the open timeout), 8.2 s with the bound; cone pairs answer within a
second and are not affected.

With ``CHECK_RETRANSMISSIONS`` = 3 a check goes out at 0, 0.5, 1.5 and 3.5 s and fails at 7.5 s: four
sends, enough against ordinary loss, and room for the answer's signaling delay (the answerer starts
checking first). Only connectivity checks and nominations change, i.e. STUN Binding requests that carry
ICE-CONTROLLING or ICE-CONTROLLED and choose no retransmission count; server-reflexive and TURN requests
keep aioice's count, consent checks their own (0).

aioice has no per-connection option, so :func:`bound_connectivity_checks` wraps
``aioice.ice.StunProtocol.request`` process-wide (the mesh runs in its own network process), and only for
aioice ``PATCHED_AIOICE_VERSION``, whose ``Connection.check_start`` was read: any other version is left
untouched with a warning (links then form as before, slower where an attempt is doomed).
"""

import inspect
import logging
from typing import Any

import aioice
import aioice.ice
import aioice.stun

logger = logging.getLogger(__name__)

PATCHED_AIOICE_VERSION = "0.13.0"
CHECK_RETRANSMISSIONS = 3
CHECK_TIMEOUT_S = aioice.stun.RETRY_RTO * (2 ** (CHECK_RETRANSMISSIONS + 1) - 1)  # 7.5 s
_ROLE_ATTRIBUTES = ("ICE-CONTROLLING", "ICE-CONTROLLED")
_REQUEST_PARAMETERS = ["self", "request", "addr", "integrity_key", "retransmissions"]
_aioice_request = aioice.ice.StunProtocol.request


def is_connectivity_check(request: aioice.stun.Message) -> bool:
    """True for an ICE connectivity check (or nomination): a Binding request that carries an ICE role."""
    return (
        request.message_method == aioice.stun.Method.BINDING
        and request.message_class == aioice.stun.Class.REQUEST
        and any(name in request.attributes for name in _ROLE_ATTRIBUTES)
    )


async def _bounded_request(
    self: aioice.ice.StunProtocol,
    request: aioice.stun.Message,
    addr: tuple[str, int],
    integrity_key: bytes | None = None,
    retransmissions: int | None = None,
) -> tuple[aioice.stun.Message, tuple[str, int]]:
    """aioice's StunProtocol.request, with CHECK_RETRANSMISSIONS for checks that leave the count to aioice."""
    if retransmissions is None and is_connectivity_check(request):
        retransmissions = CHECK_RETRANSMISSIONS
    return await _aioice_request(self, request, addr, integrity_key=integrity_key, retransmissions=retransmissions)


def _incompatibility() -> str | None:
    """Why this aioice cannot take the bound safely, or None when it can."""
    installed = getattr(aioice, "__version__", "unknown")
    if installed != PATCHED_AIOICE_VERSION:
        return f"aioice {installed} is installed, the bound was written for {PATCHED_AIOICE_VERSION}"
    parameters = list(inspect.signature(_aioice_request).parameters)
    if parameters != _REQUEST_PARAMETERS:
        return f"aioice {installed}: StunProtocol.request{tuple(parameters)} is not {tuple(_REQUEST_PARAMETERS)}"
    check_start = inspect.getsource(aioice.ice.Connection.check_start)
    if "pair.protocol.request(" not in check_start or "retransmissions" in check_start:
        return f"aioice {installed}: Connection.check_start no longer sends checks the way the bound expects"
    return None


def bound_connectivity_checks() -> bool:
    """Bound ICE checks as the module docstring says, from now on, process-wide; True when the bound is active.

    Idempotent. Checks already in flight keep the count they started with.
    """
    if check_bound_active():
        return True
    problem = _incompatibility()
    if problem is not None:
        logger.warning("ICE checks keep aioice's 63.5 s timeout: %s", problem)
        return False
    aioice.ice.StunProtocol.request = _bounded_request  # type: ignore[method-assign]
    logger.info(
        "ICE connectivity checks: %d retransmissions, a silent pair fails after %.1f s",
        CHECK_RETRANSMISSIONS,
        CHECK_TIMEOUT_S,
    )
    return True


def remove_check_bound() -> None:
    """Put aioice's StunProtocol.request back; a no-op when the bound is not active."""
    aioice.ice.StunProtocol.request = _aioice_request  # type: ignore[method-assign]


def check_bound_active() -> bool:
    """Whether connectivity checks started now are bounded."""
    request: Any = aioice.ice.StunProtocol.request
    return request is _bounded_request
