"""OAuth 2 / OpenID Connect sign-in, end to end against a real OpenID provider (tests/oidc/provider.mjs).

The app runs under TestClient at http://testserver; the browser's side at the provider is a separate httpx
client with its own cookie jar. Each test follows the redirects by hand between the two, so it can alter
exactly one thing (state, nonce, iss, the session) on the way and see the app refuse it."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import httpx2
import pytest
from authlib.integrations.starlette_client import OAuth
from fastapi.testclient import TestClient
from itsdangerous import TimestampSigner
from joserfc.errors import InvalidClaimError
from sqlalchemy import func, select

from hivewire_server.auth.oidc import github_profile, id_token_checks, registration_options
from hivewire_server.core.config import OidcProviderConfig
from hivewire_server.main import SESSION_COOKIE, create_app
from hivewire_server.models import Identity, User
from tests.conftest import make_settings

if TYPE_CHECKING:
    from tests.oidc_fixture import OidcProvider

pytest_plugins = ["tests.oidc_fixture"]

NAME = "test"  # the provider's name in the app: the test provider redirects to its callback


def provider_settings(provider: OidcProvider) -> dict[str, object]:
    return {
        "name": NAME,
        "kind": "oidc",
        "client_id": provider.client_id,
        "client_secret": provider.client_secret,
        "discovery_url": provider.discovery_url,
        "display_name": "Test IdP",
    }


@pytest.fixture
def client(database_url: str, oidc_provider: OidcProvider) -> Iterator[TestClient]:
    settings = make_settings(database_url, oidc_providers=[provider_settings(oidc_provider)])
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def browser(oidc_provider: OidcProvider) -> Iterator[httpx.Client]:
    """The browser as the provider sees it: its own cookies, on 127.0.0.1 only."""
    with httpx.Client(base_url=oidc_provider.issuer) as provider_client:
        yield provider_client


# --- driving the flow ------------------------------------------------------------------------------------


def start(client: TestClient, next_path: str = "/") -> httpx.URL:
    """The app's redirect to the provider's authorization endpoint."""
    response = client.get(f"/auth/{NAME}/login", params={"next": next_path}, follow_redirects=False)
    assert response.status_code == 302, response.text
    return httpx.URL(response.headers["location"])


def authorize(browser: httpx.Client, url: httpx.URL, **interaction: str) -> httpx.URL:
    """Follows the provider's redirects, answering its interaction, until it sends the browser back."""
    for _ in range(10):
        response = browser.get(url)
        assert response.is_redirect, f"{response.status_code} from the provider: {response.text}"
        url = response.url.join(response.headers["location"])
        if url.host == "testserver":
            return url
        if url.path.startswith("/interaction/"):
            url = url.copy_merge_params(interaction)
    raise AssertionError("the provider never redirected back to the app")


def finish(client: TestClient, callback: httpx.URL) -> httpx2.Response:
    return client.get(str(callback), follow_redirects=False)


def sign_in(client: TestClient, browser: httpx.Client, account: str, next_path: str = "/") -> httpx2.Response:
    return finish(client, authorize(browser, start(client, next_path), account=account))


def read_session(client: TestClient) -> dict[str, Any]:
    """The app's signed session cookie, decoded (TestClient's app knows the secret)."""
    signer = TimestampSigner(client.app.state.settings.session_secret.get_secret_value())  # type: ignore[attr-defined]
    data: dict[str, Any] = json.loads(base64.b64decode(signer.unsign(client.cookies[SESSION_COOKIE])))
    return data


def write_session(client: TestClient, data: dict[str, Any]) -> None:
    signer = TimestampSigner(client.app.state.settings.session_secret.get_secret_value())  # type: ignore[attr-defined]
    value = signer.sign(base64.b64encode(json.dumps(data).encode())).decode()
    domain = next(cookie.domain for cookie in client.cookies.jar if cookie.name == SESSION_COOKIE)
    client.cookies.set(SESSION_COOKIE, value, domain=domain)


def pending_state(client: TestClient) -> dict[str, Any]:
    """What authlib keeps between login and callback: redirect_uri, code_verifier, nonce."""
    [(key, entry)] = [(k, v) for k, v in read_session(client).items() if k.startswith(f"_state_{NAME}_")]
    return {"key": key, **entry["data"]}


def count(client: TestClient, table: type[User] | type[Identity]) -> int:
    async def run() -> int:
        async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
            return int(await session.scalar(select(func.count()).select_from(table)))

    return client.portal.call(run)  # type: ignore[union-attr]


def identities(client: TestClient) -> list[tuple[int, str, str]]:
    async def run() -> list[tuple[int, str, str]]:
        async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
            rows = await session.execute(select(Identity.user_id, Identity.provider, Identity.subject))
            return [tuple(row) for row in rows]

    return client.portal.call(run)  # type: ignore[union-attr]


def assert_refused(response: httpx2.Response, client: TestClient, reason: str) -> None:
    """A clear 400, and nothing changed: nobody signed in, no user, no identity."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "oauth_failed"
    assert body["detail"].startswith("sign-in with Test IdP failed: ")
    assert reason in body["detail"]
    assert client.get("/api/me").status_code == 401
    assert count(client, User) == 0
    assert count(client, Identity) == 0


# --- the flow that works ---------------------------------------------------------------------------------


def test_sign_in_creates_the_user_links_the_identity_and_returns_to_next(
    client: TestClient, browser: httpx.Client
) -> None:
    response = sign_in(client, browser, "alice", next_path="/device?user_code=ABCD")
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/device?user_code=ABCD"
    assert set(read_session(client)) == {"uid"}, "a fresh session: nothing from before the sign-in survives"
    me = client.get("/api/me").json()
    assert me["email"] == "alice@example.org"
    assert me["display_name"] == "Test alice"
    assert identities(client) == [(me["id"], NAME, "alice")]

    client.post("/api/auth/logout")
    again = sign_in(client, browser, "alice")
    assert again.headers["location"] == "/"
    assert client.get("/api/me").json()["id"] == me["id"], "the second sign-in finds the linked user"
    assert count(client, User) == 1
    assert identities(client) == [(me["id"], NAME, "alice")]


def test_the_next_parameter_cannot_leave_the_site(client: TestClient, browser: httpx.Client) -> None:
    response = sign_in(client, browser, "alice", next_path="https://evil.example/phish")
    assert response.headers["location"] == "/"


def test_the_authorization_request_carries_pkce_s256_state_and_nonce(
    client: TestClient, oidc_provider: OidcProvider
) -> None:
    params = start(client).params
    stored = pending_state(client)
    assert params["response_type"] == "code"
    assert params["client_id"] == "web"
    assert params["redirect_uri"] == oidc_provider.redirect_uri == stored["redirect_uri"]
    assert set(params["scope"].split()) == {"openid", "profile", "email"}
    assert params["code_challenge_method"] == "S256"
    digest = hashlib.sha256(stored["code_verifier"].encode()).digest()
    assert params["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert params["nonce"] == stored["nonce"]
    assert stored["key"] == f"_state_{NAME}_{params['state']}"


def test_the_login_page_lists_the_provider(client: TestClient) -> None:
    page = client.get("/login", params={"next": "/runs"}).text
    assert 'href="/auth/test/login?next=/runs">Test IdP</a>' in page


# --- refusals --------------------------------------------------------------------------------------------


def test_a_wrong_state_is_refused(client: TestClient, browser: httpx.Client) -> None:
    callback = authorize(browser, start(client), account="alice")
    response = finish(client, callback.copy_set_param("state", "forged-state"))
    assert_refused(response, client, "state does not match")


@pytest.mark.parametrize(
    "alter",
    [
        pytest.param(lambda url: url.copy_set_param("nonce", "someone-elses-nonce"), id="tampered"),
        pytest.param(lambda url: url.copy_remove_param("nonce"), id="absent"),
    ],
)
def test_an_id_token_without_the_nonce_sent_is_refused(
    client: TestClient, browser: httpx.Client, alter: Callable[[httpx.URL], httpx.URL]
) -> None:
    """The provider signs whatever nonce reaches it; the app must compare it with the one it sent."""
    callback = authorize(browser, alter(start(client)), account="alice")
    assert_refused(finish(client, callback), client, "nonce")


def test_a_session_that_lost_its_nonce_is_refused(client: TestClient, browser: httpx.Client) -> None:
    """authlib skips the ID token check when the stored state has no nonce; the app must not."""
    url = start(client)
    session = read_session(client)
    del session[pending_state(client)["key"]]["data"]["nonce"]
    write_session(client, session)
    assert_refused(finish(client, authorize(browser, url, account="alice")), client, "no verified ID token")


@pytest.mark.parametrize(
    "alter",
    [
        pytest.param(lambda url: url.copy_set_param("iss", "http://127.0.0.1:1"), id="other-issuer"),
        pytest.param(lambda url: url.copy_remove_param("iss"), id="absent"),
    ],
)
def test_an_iss_parameter_that_is_not_the_providers_is_refused(
    client: TestClient, browser: httpx.Client, alter: Callable[[httpx.URL], httpx.URL]
) -> None:
    """RFC 9207: the provider advertises `iss` in its responses, so a missing or foreign one is a mix-up."""
    callback = authorize(browser, start(client), account="alice")
    assert "iss" in callback.params, "the provider sends RFC 9207's iss"
    assert_refused(finish(client, alter(callback)), client, "iss")


def test_access_denied_at_the_provider_is_a_clear_400(client: TestClient, browser: httpx.Client) -> None:
    callback = authorize(browser, start(client), deny="1")
    assert callback.params["error"] == "access_denied"
    assert_refused(finish(client, callback), client, "access_denied: the test user declined")


def test_an_unknown_provider_is_404(client: TestClient) -> None:
    for path in ("/auth/nope/login", "/auth/nope/callback?code=x&state=y"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 404
        assert response.json()["code"] == "unknown_provider"


async def test_an_id_token_for_another_audience_is_refused(oidc_provider: OidcProvider) -> None:
    """A genuine ID token from the same provider, issued to the second client, fails the check the callback
    runs: a real provider never hands the app such a token in a code flow, so it is fed in directly."""
    app = create_app(make_settings("sqlite:///unused.db", oidc_providers=[provider_settings(oidc_provider)]))
    ours = app.state.oauth.create_client(NAME)
    theirs = OAuth().register("theirs", **registration_options(_other_client(oidc_provider)))
    async with httpx.AsyncClient(base_url=oidc_provider.issuer) as browser:
        created = await theirs.create_authorization_url(oidc_provider.redirect_uri)
        url = httpx.URL(created["url"])
        for _ in range(10):
            response = await browser.get(url, params={"account": "alice"} if "/interaction/" in url.path else None)
            url = response.url.join(response.headers["location"])
            if url.host == "testserver":
                break
    token = await theirs.fetch_access_token(
        redirect_uri=oidc_provider.redirect_uri, code=url.params["code"], code_verifier=created["code_verifier"]
    )
    assert (await theirs.parse_id_token(token, nonce=created["nonce"]))["aud"] == "other"
    with pytest.raises(InvalidClaimError, match="aud"):
        await ours.parse_id_token(token, nonce=created["nonce"], claims_options=await id_token_checks(ours))


def _other_client(provider: OidcProvider) -> OidcProviderConfig:
    return OidcProviderConfig.model_validate(
        {**provider_settings(provider), "name": "theirs", "client_id": provider.other_client_id}
    )


def test_the_server_starts_while_the_provider_is_down(database_url: str) -> None:
    """Discovery waits for the first sign-in; then an unreachable provider is a clear error, not a 500."""
    down = {"name": NAME, "client_id": "web", "client_secret": "x", "discovery_url": "http://127.0.0.1:9/.well-known"}
    with TestClient(create_app(make_settings(database_url, oidc_providers=[down]))) as client:
        assert client.get("/healthz").status_code == 200
        response = client.get(f"/auth/{NAME}/login", follow_redirects=False)
    assert response.status_code == 400
    assert "could not load its configuration (ConnectError)" in response.json()["detail"]


# --- the GitHub preset -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("public_email", "emails", "expected"),
    [
        (
            None,
            [
                {"email": "old@example.org", "primary": False, "verified": True},
                {"email": "octo@example.org", "primary": True, "verified": True},
            ],
            "octo@example.org",
        ),
        (None, [{"email": "octo@example.org", "primary": True, "verified": False}], None),
        ("public@example.org", None, "public@example.org"),
    ],
    ids=["private-verified-primary", "private-unverified", "public"],
)
async def test_the_github_preset_reads_user_and_emails(
    public_email: str | None, emails: list[dict[str, object]] | None, expected: str | None
) -> None:
    """GitHub cannot be reached from tests: a MockTransport at the transport edge answers its REST API."""
    seen: list[str] = []

    def github_api(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.url.path)
        assert request.headers["authorization"] == "Bearer gho_test"
        if request.url.path == "/user":
            return httpx2.Response(200, json={"id": 583231, "login": "octocat", "name": None, "email": public_email})
        assert request.url.path == "/user/emails" and emails is not None
        return httpx2.Response(200, json=emails)

    config = OidcProviderConfig(name="github", kind="github", client_id="Iv1.test", client_secret="secret")
    options = registration_options(config)
    assert options["authorize_url"] == "https://github.com/login/oauth/authorize"
    options["client_kwargs"]["transport"] = httpx2.MockTransport(github_api)
    github = OAuth().register("github", **options)
    profile = await github_profile(github, {"access_token": "gho_test", "token_type": "bearer"})
    assert (profile.subject, profile.email, profile.display_name) == ("583231", expected, "octocat")
    assert seen == (["/user"] if public_email else ["/user", "/user/emails"])
