"""Every error the volunteer client raises on purpose, so the CLI can print one sentence of advice per case.

    HivewireError                 base: a message (what happened) and `advice` (what the volunteer can do)
    ├── ConfigError               a config file, flag or environment variable holds an invalid value
    ├── InvalidRunURL             the run URL given to `hivewire join` is not `<server>/runs/<slug>`
    ├── IdentityError             the peer key file cannot be read, written or parsed
    ├── NotSignedIn               no API token is stored for this server (client side, before any request)
    ├── LoginFailed               the device login was denied, expired or refused
    ├── DeviceUnavailable         the torch device asked for (--device cuda, mps, ...) cannot train here
    ├── CertificateError          a peer certificate (JWT) failed verification; `reason` says which check
    ├── ServerUnreachable         no HTTP exchange happened: DNS, connection, TLS or timeout
    ├── InvalidResponse           the server answered something that breaks docs/protocol.md
    └── APIError                  the server answered with an error status; `status` and `code` carry it
        ├── OAuthError            400 with an RFC 6749 body (device token endpoint); `error` names it
        ├── RequestRejected       400, 409, 413, 422: the request itself was refused
        ├── AuthenticationFailed  401: the stored token is unknown, revoked or expired
        ├── Forbidden             403: signed in, but not allowed (private run, allowlist)
        │   ├── Banned            403 with code "banned": the organizer banned this account
        │   └── RunClosed         403 with code "run_closed": the organizer stopped taking volunteers
        ├── RunFull               409 with code "run_full": as many peers train as the organizer allows
        ├── NotFound              404: no such run or resource
        ├── RateLimited           429: too many requests; `retry_after_s` when the server said
        └── ServerError           5xx: the server failed

Status codes become these exceptions in exactly one place: `hivewire.api.HivewireAPI.request`.
"""

from __future__ import annotations

__all__ = [
    "APIError",
    "AuthenticationFailed",
    "Banned",
    "CertificateError",
    "ConfigError",
    "DeviceUnavailable",
    "Forbidden",
    "HivewireError",
    "IdentityError",
    "InvalidResponse",
    "InvalidRunURL",
    "LoginFailed",
    "NotFound",
    "NotSignedIn",
    "OAuthError",
    "RateLimited",
    "RequestRejected",
    "RunClosed",
    "RunFull",
    "ServerError",
    "ServerUnreachable",
]


class HivewireError(Exception):
    """Base class: `str(error)` says what happened, `advice` says what to do about it."""

    advice = "If this keeps happening, report it to the run's organizer with the message above."

    def __init__(self, message: str, *, advice: str | None = None) -> None:
        super().__init__(message)
        if advice is not None:
            self.advice = advice


class ConfigError(HivewireError):
    advice = "Fix the value named above in the flag, the environment or the config file, then try again."


class InvalidRunURL(HivewireError):
    advice = "Copy the run URL from the run's page; it looks like https://host/runs/<run-name>."


class IdentityError(HivewireError):
    advice = "Check the permissions of the peer key file named above, or delete it to get a new peer id."


class NotSignedIn(HivewireError):
    advice = "Run `hivewire login <server url>` first."


class LoginFailed(HivewireError):
    advice = "Run `hivewire login <server url>` again and approve the code in your browser within 10 minutes."


class DeviceUnavailable(HivewireError):
    advice = "Leave out --device to train on the CPU, or install the PyTorch build for your GPU (pytorch.org)."


# For a PyTorch built without CUDA, the GPU is not the problem: the install is.
NO_CUDA_BUILD_ADVICE = "Install a CUDA build of PyTorch (pytorch.org), or leave out --device to train on the CPU."


# A fresh certificate that reads as expired, or as issued in the future, means this computer's clock is wrong.
CLOCK_ADVICE = "Set this computer's clock to the right time (it is off by a minute or more), then try again."
_CLOCK_REASONS = ("expired", "issued in the future")


class CertificateError(HivewireError):
    """A certificate failed one named check; `reason` is that check, for logs and tests."""

    advice = "Run `hivewire join` again; if it fails again, the server or a peer is misconfigured."

    def __init__(self, reason: str, *, advice: str | None = None) -> None:
        if advice is None and reason in _CLOCK_REASONS:
            advice = CLOCK_ADVICE
        super().__init__(f"invalid peer certificate: {reason}", advice=advice)
        self.reason = reason


class ServerUnreachable(HivewireError):
    advice = "Check the server URL and your network connection, then try again."


class InvalidResponse(HivewireError):
    advice = (
        "Check that the URL points at a Hivewire server and that your client is up to date (pip install -U hivewire)."
    )


class APIError(HivewireError):
    """The server refused the request: `status` is the HTTP status, `code` the server's machine-readable code."""

    def __init__(self, message: str, *, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class OAuthError(APIError):
    """An RFC 6749 error body (`{"error": ...}`); the device login turns these into its own states."""

    advice = "Run `hivewire login <server url>` again."

    def __init__(self, error: str, description: str | None, *, status: int) -> None:
        text = f"{error}: {description}" if description else error
        super().__init__(text, status=status, code=error)
        self.error = error


class RequestRejected(APIError):
    advice = "Check the command's arguments; if they are right, your client may be older than the server."


class AuthenticationFailed(APIError):
    advice = "Your token was revoked or expired: run `hivewire login <server url>` again."


class Forbidden(APIError):
    advice = "Ask the run's organizer to add your account to the run."


class Banned(Forbidden):
    advice = "The organizer banned this account from the run; contact them if you think this is a mistake."


class RunClosed(Forbidden):
    advice = "The organizer closed this run to new volunteers; find another with `hivewire runs`."


class RunFull(APIError):
    advice = "The run has as many volunteers as its organizer allows; try again later."


class NotFound(APIError):
    advice = "Check the run name with `hivewire runs`."


class RateLimited(APIError):
    advice = "Wait a minute, then try again."

    def __init__(self, message: str, *, status: int, code: str | None, retry_after_s: float | None) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after_s = retry_after_s


class ServerError(APIError):
    advice = "The server failed; try again in a few minutes, and tell the organizer if it persists."
