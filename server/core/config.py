"""One Settings object for the server process, read from environment variables (prefix-free, documented in
docs/operations.md). Everything else receives it instead of reading the environment."""

from __future__ import annotations

import json
from functools import cached_property
from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEV_SECRET = "dev-insecure-session-secret-change-me"
DEV_TURN_SECRET = "dev-insecure-turn-secret-change-me"


class OidcProviderConfig(BaseModel):
    """A sign-in provider. `kind` picks a preset (github, huggingface) or generic OpenID Connect discovery."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    kind: Literal["oidc", "github", "huggingface"] = "oidc"
    client_id: str
    client_secret: SecretStr
    discovery_url: AnyHttpUrl | None = None  # required for kind=oidc
    display_name: str = ""
    scope: str = ""  # empty: the preset's default

    @model_validator(mode="after")
    def _discovery_for_oidc(self) -> OidcProviderConfig:
        if self.kind == "oidc" and self.discovery_url is None:
            raise ValueError(f"provider {self.name!r}: kind 'oidc' needs discovery_url")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # development | production; production refuses the placeholder secrets below.
    environment: Literal["development", "production"] = "development"
    # SQLAlchemy URL; sqlite:///path or postgresql://user@host/db (async drivers are chosen automatically).
    database_url: str = "sqlite:///var/hivewire.db"
    # The URL volunteers and browsers use to reach this server (certificate issuer, OAuth redirects).
    public_url: AnyHttpUrl = AnyHttpUrl("http://127.0.0.1:8000")
    # Signs browser session cookies.
    session_secret: SecretStr = SecretStr(DEV_SECRET)
    # JSON list of OidcProviderConfig objects.
    oidc_providers: Annotated[list[OidcProviderConfig], NoDecode] = []
    # STUN URLs (comma separated) and TURN URLs handed to peers; empty means none.
    stun_urls: Annotated[list[str], NoDecode] = []
    turn_urls: Annotated[list[str], NoDecode] = []
    # coturn's static-auth-secret (use-auth-secret scheme).
    turn_secret: SecretStr = SecretStr(DEV_TURN_SECRET)
    # Lifetime of peer certificates and TURN credentials, seconds.
    certificate_lifetime_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # Largest accepted HTTP request body, bytes.
    max_request_bytes: int = Field(default=64 * 1024, ge=1024)
    # How many live peers a join answer names.
    initial_peers_count: int = Field(default=8, ge=0, le=64)
    # A peer is live if it was seen within this many seconds.
    peer_live_seconds: int = Field(default=120, ge=5)
    # Redis URL for signaling fan-out between replicas; empty means in-process only.
    redis_url: str = ""
    # Largest signaling WebSocket message, bytes of UTF-8 text; a larger one closes the connection (1009).
    signal_max_message_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Signaling messages per second a peer may send on average (token bucket refill); faster closes (4008).
    signal_messages_per_second: int = Field(default=20, ge=1, le=10_000)
    # Signaling messages a peer may send at once (token bucket capacity).
    signal_burst: int = Field(default=100, ge=1, le=100_000)
    # Seconds between a peer's signaling heartbeats; silence for three of them disconnects it.
    signal_heartbeat_seconds: int = Field(default=15, ge=1, le=300)
    # Most samples per second one peer can plausibly process; reports and receipts claiming more are refused.
    max_samples_per_second: float = Field(default=100_000.0, gt=0)
    # Seconds of allowance added to the time a peer had to process the samples it claims.
    report_slack_seconds: float = Field(default=30.0, ge=0)
    # How far ahead of the server's clock a report's time may be, seconds.
    report_max_skew_seconds: float = Field(default=60.0, ge=0)
    # Oldest report accepted, seconds: reports buffered during an outage longer than this are refused.
    report_max_age_seconds: float = Field(default=7 * 24 * 3600.0, ge=60)
    # A gap between a peer's reports longer than this counts as offline (online time grows by at most this).
    report_online_gap_seconds: float = Field(default=300.0, ge=1)
    # How long after a member's certificate expired a round receipt naming it is still accepted, seconds.
    receipt_certificate_grace_seconds: int = Field(default=24 * 3600, ge=0, le=30 * 24 * 3600)
    # Directory of built client wheels (hivewire-*.whl), served under /downloads; the join page then shows
    # `pip install` of the newest. Empty: nothing is served and the join page says `pip install hivewire`.
    client_wheel_dir: str = ""
    log_level: str = "INFO"

    @field_validator("oidc_providers", mode="before")
    @classmethod
    def _parse_providers(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else []
        return value

    @field_validator("stun_urls", "turn_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _no_placeholders_in_production(self) -> Settings:
        if self.environment == "production":
            for name, secret, placeholder in (
                ("SESSION_SECRET", self.session_secret, DEV_SECRET),
                ("TURN_SECRET", self.turn_secret, DEV_TURN_SECRET),
            ):
                value = secret.get_secret_value()
                if value == placeholder or len(value) < 32:
                    raise ValueError(f"{name} must be set to a random value of 32+ characters in production")
        return self

    @cached_property
    def base_url(self) -> str:
        """The public URL without a trailing slash."""
        return str(self.public_url).rstrip("/")
