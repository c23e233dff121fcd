"""Sign-in through OAuth 2 / OpenID Connect providers (authlib's Starlette client).

Presets: GitHub (plain OAuth 2, the user comes from its REST API), Hugging Face (OpenID Connect discovery),
and any OpenID Connect issuer by discovery URL. Discovery is fetched on the first sign-in, never at start,
so a provider that is down does not keep the server from starting.

authlib checks state, PKCE and, for OpenID Connect, the ID token's signature, iss, nonce and exp. Three gaps
are closed here: the RFC 9207 `iss` parameter of the authorization response; the ID token's `aud`, which
authlib checks only through `azp`; and authlib skipping the ID token check when the stored state has no
nonce (an OpenID sign-in without a verified ID token fails)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import httpx2
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.base_client import MismatchingStateError
from authlib.integrations.starlette_client import OAuth, StarletteOAuth2App
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse
from joserfc.errors import JoseError

from hivewire_server.accounts import user_for_identity
from hivewire_server.api.deps import SESSION_USER_KEY, SessionDep, SettingsDep
from hivewire_server.core.config import OidcProviderConfig, Settings
from hivewire_server.dashboard.routes import safe_next
from hivewire_server.errors import InvalidInput, NotFound

log = logging.getLogger("hivewire.oidc")
router = APIRouter(prefix="/auth", include_in_schema=False)

NEXT_KEY = "oauth_next"  # where to go after the callback; kept in the signed session cookie
OPENID_SCOPE = "openid profile email"
GITHUB_SCOPE = "read:user user:email"
HUGGINGFACE_DISCOVERY = "https://huggingface.co/.well-known/openid-configuration"
PROVIDER_TIMEOUT_SECONDS = 10.0  # each request to a provider: discovery, JWKS, token exchange, GitHub's API
_LABELS = {"github": "GitHub", "huggingface": "Hugging Face"}


@dataclass(frozen=True)
class Provider:
    """What the login page lists and the routes look up; never holds the secret."""

    name: str
    label: str
    kind: Literal["oidc", "github", "huggingface"]

    @property
    def is_openid(self) -> bool:
        return self.kind != "github"


@dataclass(frozen=True)
class Profile:
    """The provider's account, reduced to what `user_for_identity` needs."""

    subject: str
    email: str | None
    display_name: str


def registration_options(config: OidcProviderConfig) -> dict[str, Any]:
    """authlib `OAuth.register` keyword arguments for one provider (endpoints, scope, PKCE S256)."""
    scope = config.scope or (GITHUB_SCOPE if config.kind == "github" else OPENID_SCOPE)
    if config.kind != "github" and "openid" not in scope.split():
        raise ValueError(f"provider {config.name!r}: an OpenID Connect scope must include 'openid', got {scope!r}")
    options: dict[str, Any] = {
        "client_id": config.client_id,
        "client_secret": config.client_secret.get_secret_value(),
        "client_kwargs": {"scope": scope, "code_challenge_method": "S256", "timeout": PROVIDER_TIMEOUT_SECONDS},
    }
    if config.kind == "github":
        options |= {
            "authorize_url": "https://github.com/login/oauth/authorize",
            "access_token_url": "https://github.com/login/oauth/access_token",
            "api_base_url": "https://api.github.com/",
        }
    else:
        discovery = HUGGINGFACE_DISCOVERY if config.kind == "huggingface" else str(config.discovery_url)
        options["server_metadata_url"] = discovery
    return options


def profile_from_claims(claims: dict[str, Any]) -> Profile:
    """An email counts only when the provider says it verified it: it becomes the account's address."""
    email = claims.get("email") if claims.get("email_verified") is True else None
    name = claims.get("name") or claims.get("preferred_username") or claims.get("email") or claims["sub"]
    return Profile(subject=str(claims["sub"]), email=email, display_name=str(name))


async def github_profile(client: StarletteOAuth2App, token: dict[str, Any]) -> Profile:
    """GitHub has no ID token: `/user` gives the numeric id; a private address needs `/user/emails`."""
    response = await client.get("user", token=token)
    response.raise_for_status()
    user = response.json()
    email = user.get("email")
    if not email:
        response = await client.get("user/emails", token=token)
        response.raise_for_status()
        email = next((item["email"] for item in response.json() if item.get("primary") and item.get("verified")), None)
    return Profile(subject=str(user["id"]), email=email, display_name=user.get("name") or user["login"])


def _lookup(request: Request, name: str) -> tuple[Provider, StarletteOAuth2App]:
    providers: list[Provider] = request.app.state.oauth_providers
    provider = next((provider for provider in providers if provider.name == name), None)
    if provider is None:
        known = ", ".join(provider.name for provider in providers) or "none configured"
        raise NotFound(f"no sign-in provider named {name!r} (known: {known})", code="unknown_provider")
    return provider, request.app.state.oauth.create_client(name)


def _shown(text: str, limit: int = 200) -> str:
    """Provider- or attacker-supplied text, cut short and without control characters (no forged log lines)."""
    return "".join(char if char.isprintable() else "?" for char in text[:limit])


def _failed(provider: Provider, reason: str) -> InvalidInput:
    log.warning("sign-in through %s refused: %s", provider.name, reason)
    return InvalidInput(f"sign-in with {provider.label} failed: {reason}", code="oauth_failed")


async def _check_issuer(provider: Provider, client: StarletteOAuth2App, request: Request) -> None:
    """RFC 9207: the response must name the issuer the request went to (mix-up attacks). GitHub publishes
    no metadata; its own callback path per provider is the defense the RFC accepts in that case."""
    metadata = await client.load_server_metadata()
    expected = metadata.get("issuer")
    sent = request.query_params.get("iss")
    if expected is None:
        if provider.is_openid:
            raise _failed(provider, "its discovery document names no issuer")
        return
    if sent is None and metadata.get("authorization_response_iss_parameter_supported"):
        raise _failed(provider, "the response lacks the `iss` parameter the provider promises to send")
    if sent is not None and sent != expected:
        raise _failed(provider, f"the response names issuer {_shown(sent)!r}, expected {expected!r}")


async def id_token_checks(client: StarletteOAuth2App) -> dict[str, Any]:
    """authlib's claims options for the ID token. Left to itself it checks `aud` only through `azp` (a token
    for several audiences naming us as `azp` but not in `aud` would pass): require both iss and aud."""
    metadata = await client.load_server_metadata()
    return {
        "iss": {"essential": True, "value": metadata["issuer"]},
        "aud": {"essential": True, "value": client.client_id},
    }


async def _profile(provider: Provider, client: StarletteOAuth2App, request: Request) -> Profile:
    """Exchanges the code (state, PKCE and the ID token checked by authlib) and reads who signed in."""
    try:
        await _check_issuer(provider, client, request)
        if not provider.is_openid:
            return await github_profile(client, await client.authorize_access_token(request))
        token = await client.authorize_access_token(request, claims_options=await id_token_checks(client))
    except MismatchingStateError as exc:
        raise _failed(provider, "the state does not match a sign-in started here (expired or forged)") from exc
    except AuthlibBaseError as exc:
        detail = _shown(str(exc.description or "no description"))
        raise _failed(provider, f"the provider answered {_shown(str(exc.error))}: {detail}") from exc
    except JoseError as exc:
        raise _failed(provider, f"the ID token is not valid ({exc.error}: {exc.description})") from exc
    except httpx2.HTTPError as exc:
        raise _failed(provider, f"could not talk to the provider ({type(exc).__name__}); try again later") from exc
    except ValueError as exc:  # a body that is not the JSON it should be
        raise _failed(provider, f"the provider's answer was unusable ({type(exc).__name__})") from exc
    claims = token.get("userinfo")
    if not claims:  # no ID token, or no nonce to check it against: authlib would skip the checks
        raise _failed(provider, "no verified ID token came back")
    return profile_from_claims(dict(claims))


@router.get("/{name}/login")
async def login(request: Request, name: str, settings: SettingsDep, next: str = "/") -> RedirectResponse:
    provider, client = _lookup(request, name)
    request.session[NEXT_KEY] = safe_next(next)
    try:
        return await client.authorize_redirect(request, f"{settings.base_url}/auth/{name}/callback")
    except (httpx2.HTTPError, ValueError) as exc:
        raise _failed(provider, f"could not load its configuration ({type(exc).__name__}); try again later") from exc


@router.get("/{name}/callback")
async def callback(request: Request, name: str, session: SessionDep) -> RedirectResponse:
    provider, client = _lookup(request, name)
    error = request.query_params.get("error")
    if error is not None:
        description = request.query_params.get("error_description", "no description")
        raise _failed(provider, f"the provider answered {_shown(error)}: {_shown(description)}")
    profile = await _profile(provider, client, request)
    user = await user_for_identity(
        session,
        provider=provider.name,
        subject=profile.subject,
        email=profile.email,
        display_name=profile.display_name,
    )
    target = safe_next(str(request.session.get(NEXT_KEY, "/")))
    request.session.clear()  # a fresh session: no fixation of the pre-login one
    request.session[SESSION_USER_KEY] = user.id
    log.info("user %s signed in through %s", user.id, provider.name)
    return RedirectResponse(target, status_code=303)


def install(app: FastAPI, settings: Settings) -> None:
    """Registers the configured providers (no network) and the routes; the login page lists the providers."""
    oauth = OAuth()
    providers: list[Provider] = []
    for config in settings.oidc_providers:
        oauth.register(config.name, **registration_options(config))
        label = config.display_name or _LABELS.get(config.kind, config.name)
        providers.append(Provider(name=config.name, label=label, kind=config.kind))
    app.state.oauth = oauth
    app.state.oauth_providers = providers
    app.include_router(router)
