"""Request and response records of the HTTP API (docs/protocol.md), apart from the tables."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints

Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]
RecipeName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
Strategy = Literal["dedloc", "diloco"]
Compression = Literal["none", "fp16", "int8"]
Visibility = Literal["public", "private"]
JoinPolicy = Literal["open", "allowlist"]
RunStatus = Literal["open", "closed"]
MAX_PEERS_LIMIT = 100_000
# An averaging round's result names its contributors in a 64-bit mask (the client's averaging/partition.py).
MAX_GROUP_SIZE = 64
MAX_INNER_STEPS = 100_000


class Strict(BaseModel):
    """Unknown fields are refused: a typo in a request should not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


# -- users and sign-in ---------------------------------------------------------------------------------


class SignupRequest(Strict):
    email: EmailStr = Field(max_length=320)
    password: str = Field(min_length=1, max_length=1024)
    display_name: str = Field(min_length=1, max_length=100)


class LoginRequest(Strict):
    email: EmailStr = Field(max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str | None
    display_name: str
    is_organizer: bool


class TokenCreate(Strict):
    name: str = Field(default="cli", min_length=1, max_length=100)


class TokenPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str


class TokensPublic(BaseModel):
    data: list[TokenPublic]
    count: int


# -- device authorization (RFC 8628) -------------------------------------------------------------------


class DeviceCodeResponse(BaseModel):
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    expires_in: int
    interval: int


class DeviceApproveRequest(Strict):
    user_code: str = Field(min_length=8, max_length=16)
    approve: bool


class DeviceTokenResponse(BaseModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"


# -- runs ----------------------------------------------------------------------------------------------


class RunFields(Strict):
    name: str = Field(min_length=1, max_length=100)
    description: str = Field(default="", max_length=4000)
    recipe: RecipeName
    recipe_version: str = Field(default="1", min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._+-]+$")
    strategy: Strategy = "dedloc"
    target_batch_size: int = Field(ge=1, le=10**9)
    group_size: int = Field(default=16, ge=2, le=MAX_GROUP_SIZE)
    compression: Compression = "none"
    visibility: Visibility = "public"
    join_policy: JoinPolicy = "open"
    max_peers: int = Field(default=0, ge=0, le=MAX_PEERS_LIMIT)  # live peers at once; 0: no limit
    # diloco only (stored for any strategy, so switching strategy keeps them): every volunteer of the run uses
    # the same H and the same overlap, or their averaging rounds would not line up.
    inner_steps: int = Field(default=500, ge=1, le=MAX_INNER_STEPS)  # local steps between two averaging rounds
    overlap: bool = True  # average beside computation; the outer step lands one round late


class RunCreate(RunFields):
    slug: Slug


class RunUpdate(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=100)
    description: str | None = Field(default=None, max_length=4000)
    recipe: RecipeName | None = None
    recipe_version: str | None = Field(default=None, min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._+-]+$")
    strategy: Strategy | None = None
    target_batch_size: int | None = Field(default=None, ge=1, le=10**9)
    group_size: int | None = Field(default=None, ge=2, le=MAX_GROUP_SIZE)
    compression: Compression | None = None
    visibility: Visibility | None = None
    join_policy: JoinPolicy | None = None
    max_peers: int | None = Field(default=None, ge=0, le=MAX_PEERS_LIMIT)
    inner_steps: int | None = Field(default=None, ge=1, le=MAX_INNER_STEPS)
    overlap: bool | None = None
    status: RunStatus | None = None  # closed: no more joins or certificate renewals


class RunSpec(BaseModel):
    """What a client needs to train (docs/protocol.md, RunSpec)."""

    model_config = ConfigDict(from_attributes=True)

    slug: str
    name: str
    description: str
    recipe: str
    recipe_version: str
    strategy: Strategy
    target_batch_size: int
    group_size: int
    compression: Compression
    visibility: Visibility
    join_policy: JoinPolicy
    max_peers: int
    inner_steps: int
    overlap: bool
    status: RunStatus


class RunsPublic(BaseModel):
    data: list[RunSpec]
    count: int


class UserRef(Strict):
    user_id: int = Field(ge=1)


class BanRequest(UserRef):
    reason: str = Field(default="", max_length=500)


class MemberPublic(BaseModel):
    user_id: int
    display_name: str
    allowed: bool
    joined_at: datetime | None
    banned_at: datetime | None
    ban_reason: str


class MembersPublic(BaseModel):
    data: list[MemberPublic]
    count: int


# -- join ----------------------------------------------------------------------------------------------


class JoinRequest(Strict):
    peer_key: str = Field(min_length=43, max_length=43, description="base64url Ed25519 public key")


class RenewRequest(Strict):
    certificate: str = Field(min_length=1, max_length=4096)


class JoinResponse(BaseModel):
    peer_id: str
    certificate: str
    certificate_expires_at: datetime
    ice_servers: list[dict[str, Any]]
    run: RunSpec
    initial_peers: list[str]
    signaling_url: str


# -- reports, round receipts, leaderboard (docs/protocol.md, "Reports" and "Round receipts") -------------

PeerId = Annotated[str, StringConstraints(pattern=r"^p[a-z2-7]{24}$")]
Signature = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{86}$")]  # 64 bytes, base64url
Count = Annotated[int, Field(strict=True, ge=0, le=2**53)]  # strict: 1.0 or true would change the signed bytes
Finite = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class LinkTypes(Strict):
    """How many of the peer's links use each connection type (ICE candidate type, or direct TLS)."""

    host: int = Field(default=0, strict=True, ge=0, le=100_000)
    srflx: int = Field(default=0, strict=True, ge=0, le=100_000)
    relay: int = Field(default=0, strict=True, ge=0, le=100_000)
    direct_tls: int = Field(default=0, strict=True, ge=0, le=100_000)


class LinkRate(Strict):
    """One of the peer's links: its connection type and the payload rate measured on it (0 = not measured)."""

    type: Literal["host", "srflx", "relay", "direct_tls"]
    bytes_per_s: float = Field(ge=0, le=1e12, allow_inf_nan=False)


class ReportIn(Strict):
    report_id: str = Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    peer_id: PeerId
    epoch: Count
    samples: Count
    loss: Finite
    samples_per_second: Finite
    link_types: LinkTypes
    links: list[LinkRate] | None = Field(default=None, max_length=64)  # optional: older clients omit it
    client_version: str = Field(pattern=r"^[A-Za-z0-9._+-]{1,32}$")
    device_kind: str = Field(pattern=r"^[a-z0-9_-]{1,16}$")
    time: Finite
    signature: Signature


class ReportBatch(Strict):
    # Each report is validated on its own, so one malformed report is refused without its neighbours.
    reports: list[dict[str, Any]]


class RefusedReport(BaseModel):
    report_id: str | None
    reason: str
    detail: str


class ReportsAnswer(BaseModel):
    accepted: list[str]
    duplicate: list[str]
    refused: list[RefusedReport]


class ReceiptMember(Strict):
    peer_id: PeerId
    certificate: str = Field(min_length=1, max_length=4096)
    samples: Count


class ReceiptIn(Strict):
    round_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")
    epoch: Count
    members: list[ReceiptMember] = Field(min_length=2, max_length=256)
    signatures: dict[PeerId, Signature] = Field(max_length=256)


class ReceiptAnswer(BaseModel):
    round_id: str
    status: Literal["stored", "duplicate"]


class LeaderboardRow(BaseModel):
    rank: int
    user_id: int
    display_name: str
    verified_samples: int
    reported_samples: int
    online_seconds: float
    rounds: int


class Leaderboard(BaseModel):
    data: list[LeaderboardRow]
    count: int


class MetricsBucket(BaseModel):
    start: datetime
    loss_mean: float | None
    samples_per_second: float
    active_peers: int
    reports: int


class RunMetrics(BaseModel):
    since: datetime
    bucket_seconds: int
    data: list[MetricsBucket]
    count: int


class VerificationFailurePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    subject: str
    reason: str
    detail: str
    user_id: int | None
    peer_id: str
    created_at: datetime


class VerificationFailures(BaseModel):
    data: list[VerificationFailurePublic]
    count: int


# -- client downloads ----------------------------------------------------------------------------------


class ClientWheelPublic(BaseModel):
    filename: str
    version: str
    size: int
    sha256: str
    url: str


class ClientWheelsPublic(BaseModel):
    """Newest first; `data[0]` is what the join page tells volunteers to install."""

    data: list[ClientWheelPublic]
    count: int
