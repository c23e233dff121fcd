"""HTTP client to the Hivewire server: records of docs/protocol.md, validated; statuses mapped in `request()`.

Every response is hostile until checked: the body is bounded before it is read whole, parsed as JSON, then
validated by a pydantic record whose fields carry the bounds of docs/protocol.md.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

import httpx
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from hivewire._text import printable
from hivewire.config import normalize_server_url
from hivewire.errors import (
    APIError,
    AuthenticationFailed,
    Banned,
    Forbidden,
    InvalidResponse,
    NotFound,
    NotSignedIn,
    OAuthError,
    RateLimited,
    RequestRejected,
    RunClosed,
    RunFull,
    ServerError,
    ServerUnreachable,
)

__all__ = [
    "MAX_RESPONSE_BYTES",
    "SLUG_PATTERN",
    "DeviceCode",
    "DeviceToken",
    "HivewireAPI",
    "IceServer",
    "JoinResponse",
    "Me",
    "RunList",
    "RunSpec",
]

# The biggest legitimate answer is a run list; anything past this is refused unread.
MAX_RESPONSE_BYTES = 1024 * 1024
CLIENT_ID = "hivewire-cli"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

SLUG_PATTERN = r"[a-z0-9][a-z0-9-]{1,62}"
Slug = Annotated[str, StringConstraints(pattern=f"^{SLUG_PATTERN}$")]
PeerId = Annotated[str, StringConstraints(pattern=r"^p[a-z2-7]{24}$")]


def _web_url(url: str) -> str:
    """A URL we may open in a browser or show as a link: http(s) only, never file: or javascript:."""
    if not re.match(r"^https?://[^\s/]+", url) or not url.isprintable():
        raise ValueError("must be an http:// or https:// URL")
    return url


WebURL = Annotated[str, StringConstraints(max_length=2048), AfterValidator(_web_url)]


class _Record(BaseModel):
    # Fields the protocol adds later are ignored, so an older client keeps working with a newer server.
    model_config = ConfigDict(extra="ignore", frozen=True)


class DeviceCode(_Record):
    """RFC 8628 device authorization response (`POST /api/device/code`)."""

    device_code: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    user_code: Annotated[str, StringConstraints(pattern=r"^[A-Z0-9-]{4,16}$")]
    verification_uri: WebURL
    verification_uri_complete: WebURL | None = None
    expires_in: int = Field(ge=1, le=3600)
    interval: int = Field(default=5, ge=1, le=60)


class DeviceToken(_Record):
    """RFC 8628 token response (`POST /api/device/token`) once the code is approved."""

    access_token: Annotated[str, StringConstraints(pattern=r"^hw_[A-Za-z0-9_-]{43}$")]
    token_type: Annotated[str, StringConstraints(pattern=r"^(?i:bearer)$")]


class Me(_Record):
    """The signed-in user (`GET /api/me`)."""

    id: int = Field(ge=1)
    email: Annotated[str, StringConstraints(max_length=320)] | None = None
    display_name: Annotated[str, StringConstraints(max_length=200)] | None = None
    is_organizer: bool


class RunSpec(_Record):
    """What a client needs to train in a run (docs/protocol.md, "Runs")."""

    slug: Slug
    name: Annotated[str, StringConstraints(max_length=100)]
    description: Annotated[str, StringConstraints(max_length=4000)] = ""
    recipe: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    recipe_version: Annotated[str, StringConstraints(max_length=32)]
    strategy: Literal["dedloc", "diloco"]
    target_batch_size: int = Field(ge=1, le=10**9)
    group_size: int = Field(ge=2, le=256)
    compression: Literal["none", "fp16", "int8"]
    visibility: Literal["public", "private"]
    join_policy: Literal["open", "allowlist"]
    # Defaults for servers older than these fields: open, no limit.
    max_peers: int = Field(default=0, ge=0, le=100_000)
    status: Literal["open", "closed"] = "open"
    # diloco's parameters, chosen by the run so its volunteers agree; an older server's runs get DiLoCo's H=500
    # with overlap, what `hivewire join` used before. Strict: a string or number for a flag is a broken answer.
    inner_steps: int = Field(default=500, ge=1, le=100_000, strict=True)
    overlap: bool = Field(default=True, strict=True)


class RunList(_Record):
    """`GET /api/runs`: the runs this user may see."""

    data: list[RunSpec] = Field(max_length=1000)
    count: int = Field(ge=0)


IceURL = Annotated[str, StringConstraints(pattern=r"^(stun|stuns|turn|turns):[^\s]{1,500}$")]


class IceServer(_Record):
    """One STUN or TURN server with its time-limited credentials (coturn shared-secret scheme)."""

    urls: list[IceURL] = Field(min_length=1, max_length=16)
    username: Annotated[str, StringConstraints(max_length=256)] | None = None
    credential: Annotated[str, StringConstraints(max_length=256)] | None = None

    @property
    def kinds(self) -> list[str]:
        """The URL schemes (`stun`, `turn`, …), for a summary a person can read."""
        return sorted({url.split(":", 1)[0] for url in self.urls})


class JoinResponse(_Record):
    """`POST /api/runs/{slug}/join`: certificate, ICE servers, run spec and peers to contact first."""

    peer_id: PeerId
    certificate: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    certificate_expires_at: AwareDatetime
    ice_servers: list[IceServer] = Field(max_length=16)
    run: RunSpec
    initial_peers: list[PeerId] = Field(max_length=64)
    signaling_url: Annotated[str, StringConstraints(pattern=r"^wss?://[^\s]{1,2000}$")]


Record = TypeVar("Record", bound=BaseModel)


def _error_fields(body: Any) -> tuple[str | None, str | None]:
    """`detail` and `code` of a protocol error body, cleaned for a terminal; None where absent or odd."""
    if not isinstance(body, dict):
        return None, None
    detail, code = body.get("detail"), body.get("code")
    return (
        printable(detail) if isinstance(detail, str) else None,
        printable(code, 64) if isinstance(code, str) else None,
    )


class HivewireAPI:
    """One server, one optional API token. `transport` lets tests put a real ASGI app (or a fake) underneath.

    Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        server_url: str,
        token: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.server_url = normalize_server_url(server_url)
        self.token = token
        headers = {"Accept": "application/json", "User-Agent": "hivewire-cli"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=self.server_url, headers=headers, timeout=timeout_s, transport=transport)

    def __enter__(self) -> HivewireAPI:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(
        self, method: str, path: str, *, json_body: dict[str, Any] | None = None, bearer: str | None = None
    ) -> Any:
        """Send one request and return its parsed JSON, or raise the `HivewireError` its status means.

        `bearer` replaces the API token for this request (a peer certificate, for reports and receipts).
        This is the only place where HTTP statuses become exceptions.
        """
        url = f"{self.server_url}{path}"
        headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else None
        try:
            with self.http.stream(method, path, json=json_body, headers=headers) as response:
                length = response.headers.get("Content-Length", "0")
                if not length.isdigit() or int(length) > MAX_RESPONSE_BYTES:
                    raise InvalidResponse(f"{method} {url}: answer larger than {MAX_RESPONSE_BYTES} bytes")
                raw = bytearray()
                for chunk in response.iter_bytes():
                    raw += chunk
                    if len(raw) > MAX_RESPONSE_BYTES:
                        raise InvalidResponse(f"{method} {url}: answer larger than {MAX_RESPONSE_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"cannot reach {self.server_url}: {exc or type(exc).__name__}") from exc
        status = response.status_code
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, RecursionError) as exc:
            if status < 300:
                raise InvalidResponse(f"{method} {url} answered HTTP {status} that is not JSON") from exc
            body = None
        if 200 <= status < 300:
            return body
        detail, code = _error_fields(body)
        message = f"{method} {path}: {detail or f'HTTP {status}'}"
        if status == 400 and isinstance(body, dict) and isinstance(body.get("error"), str):
            description = body.get("error_description")
            raise OAuthError(
                printable(body["error"], 64),
                printable(description) if isinstance(description, str) else None,
                status=status,
            )
        if status == 401:
            if self.token is None and bearer is None:
                raise NotSignedIn(f"{self.server_url} asks to sign in first")
            raise AuthenticationFailed(f"{self.server_url} did not accept the stored token", status=status, code=code)
        if status == 403:
            kind = {"banned": Banned, "run_closed": RunClosed}.get(code or "", Forbidden)
            raise kind(message, status=status, code=code)
        if status == 409 and code == "run_full":
            raise RunFull(message, status=status, code=code)
        if status == 404:
            raise NotFound(message, status=status, code=code)
        if status == 429:
            retry = response.headers.get("Retry-After", "")
            raise RateLimited(
                message, status=status, code=code, retry_after_s=float(retry) if retry.isdigit() else None
            )
        if status in (400, 409, 413, 422):
            raise RequestRejected(message, status=status, code=code)
        if status >= 500:
            raise ServerError(message, status=status, code=code)
        if 300 <= status < 400:
            location = printable(response.headers.get("Location", "?"))
            raise InvalidResponse(f"{method} {url} redirects to {location}; use the server's own URL")
        raise APIError(message, status=status, code=code)

    def _record(self, model: type[Record], method: str, path: str, json_body: dict[str, Any] | None = None) -> Record:
        """`request()`, then the answer checked against `model`."""
        body = self.request(method, path, json_body=json_body)
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise InvalidResponse(f"{method} {path}: field {where!r} breaks the protocol: {first['msg']}") from exc

    def device_code(self) -> DeviceCode:
        """Start a device login (RFC 8628, step 1)."""
        return self._record(DeviceCode, "POST", "/api/device/code", {"client_id": CLIENT_ID})

    def device_token(self, device_code: str) -> DeviceToken:
        """Poll once for the token (RFC 8628, step 3); pending and refusals arrive as `OAuthError`."""
        body = {"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": CLIENT_ID}
        return self._record(DeviceToken, "POST", "/api/device/token", body)

    def me(self) -> Me:
        return self._record(Me, "GET", "/api/me")

    def runs(self) -> RunList:
        return self._record(RunList, "GET", "/api/runs")

    def join(self, slug: str, peer_key: str) -> JoinResponse:
        """Ask for a certificate binding `peer_key` (base64url Ed25519) to this user in run `slug`."""
        if not re.fullmatch(SLUG_PATTERN, slug):
            raise ValueError(f"{slug!r} is not a run slug")
        return self._record(JoinResponse, "POST", f"/api/runs/{slug}/join", {"peer_key": peer_key})
