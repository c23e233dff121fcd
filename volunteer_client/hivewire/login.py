"""Device login (RFC 8628): wait for the volunteer to approve a code in the browser, get an API token.

The polling loop is apart from the CLI so it can be tested without a terminal, and takes its sleep and clock
as arguments so tests need not wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hivewire.api import DeviceCode, HivewireAPI
from hivewire.errors import LoginFailed, OAuthError

__all__ = ["SLOW_DOWN_STEP_S", "wait_for_token"]

# RFC 8628 §3.5: on `slow_down` the client adds 5 seconds to its interval, for this and later polls.
SLOW_DOWN_STEP_S = 5
# Longer waits than this come from a confused or hostile server, not from a person approving a code.
MAX_INTERVAL_S = 60

_REFUSALS = {
    "access_denied": "the login was denied in the browser",
    "expired_token": "the login code expired before it was approved",
    "invalid_grant": "the server no longer knows this login code",
}


def wait_for_token(
    api: HivewireAPI,
    code: DeviceCode,
    *,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> str:
    """Poll the token endpoint every `interval` seconds until approval; the API token, or `LoginFailed`."""
    interval = code.interval
    deadline = monotonic() + code.expires_in
    while True:
        if monotonic() + interval > deadline:
            raise LoginFailed(_REFUSALS["expired_token"])
        sleep(interval)
        try:
            return api.device_token(code.device_code).access_token
        except OAuthError as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval = min(interval + SLOW_DOWN_STEP_S, MAX_INTERVAL_S)
                continue
            reason = _REFUSALS.get(exc.error, f"the server refused the login ({exc})")
            raise LoginFailed(reason) from exc
