"""The sign-in routes and services against a real OpenID provider (oidc-provider-mock),
on SQLite and Postgres: the happy paths and every attack the issue lists."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import oidc_provider_mock
import pytest
import sqlalchemy as sa
from httpx2 import Response  # what Starlette's TestClient returns
from starlette.applications import Starlette
from starlette.testclient import TestClient
from starlette.types import ASGIApp

from aicredits.adapters.db import Database
from aicredits.adapters.tables import (
    auth_sessions,
    identities,
    ledger_entries,
    login_attempts,
    users,
    utcnow,
)
from aicredits.api.routes import api_transformers
from aicredits.services import auth, ledger, trials
from aicredits.services import users as users_service
from aicredits.settings import Settings, get_settings

PUBLIC = "http://localhost:3000"
TRIAL = 700


@pytest.fixture(scope="module")
def idp() -> Iterator[str]:
    os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")
    with oidc_provider_mock.run_server_in_thread(port=0, require_nonce=True) as server:
        yield f"http://localhost:{server.server_port}"


@dataclass
class Site:
    client: TestClient
    settings: Settings
    db: Database
    idp: str
    app: ASGIApp

    def peer(self, address: str, forwarded: str | None = None) -> TestClient:
        """A browser connecting from `address`, sending X-Forwarded-For when given (as a
        proxy in front would)."""
        headers = {"X-Forwarded-For": forwarded} if forwarded else None
        return TestClient(
            self.app, follow_redirects=False, client=(address, 50000), headers=headers
        )

    def start(
        self, provider: str = "dev", next_path: str = "/chat", client: TestClient | None = None
    ) -> str:
        """Press "Sign in with ...": returns the provider's authorization URL."""
        response = (client or self.client).post(
            f"/auth/login/{provider}", data={"next": next_path}, headers={"Origin": PUBLIC}
        )
        assert response.status_code == 303, response.text
        return response.headers["location"]

    def approve(self, authorization_url: str, sub: str) -> str:
        """The user approves at the provider: returns our callback path with code and state."""
        response = httpx.post(authorization_url, data={"sub": sub})
        assert response.status_code == 302, response.text
        location = urlsplit(response.headers["location"])
        return f"{location.path}?{location.query}"

    def callback(self, path: str, client: TestClient | None = None) -> Response:
        return (client or self.client).get(path)

    def sign_in(
        self,
        sub: str,
        provider: str = "dev",
        next_path: str = "/chat",
        client: TestClient | None = None,
    ) -> Response:
        return self.callback(self.approve(self.start(provider, next_path, client), sub), client)

    def set_claims(self, sub: str, **claims: object) -> None:
        response = httpx.put(f"{self.idp}/users/{quote(sub)}", json=claims)
        assert response.status_code == 204


def make_site(db_url: str, idp: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> Site:
    values = {
        "DATABASE_URL": db_url,
        "PUBLIC_URL": PUBLIC,
        "API_URL": "http://testserver",
        "DEV_OIDC_ISSUER": idp,
        "FREE_TRIAL_CREDITS": str(TRIAL),
        "ADMIN_EMAILS": "admin@example.test",
        **env,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    settings = get_settings()
    routes, secure = api_transformers(settings)
    assert isinstance(routes, Starlette) and not isinstance(secure, Starlette)
    app = secure(routes)
    return Site(TestClient(app, follow_redirects=False), settings, Database(db_url), idp, app)


@pytest.fixture
def site(db_url: str, idp: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    s = make_site(db_url, idp, monkeypatch)
    yield s
    s.db.dispose()
    get_settings.cache_clear()


@pytest.fixture
def strict_site(db_url: str, idp: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """Dev sign-in beside a configured OIDC provider that trusts only verified emails."""
    s = make_site(
        db_url,
        idp,
        monkeypatch,
        OIDC_ISSUER=idp,
        OIDC_CLIENT_ID="aicredits-test",
        OIDC_CLIENT_SECRET="not-a-secret",
        OIDC_LABEL="Test SSO",
    )
    # With a real provider configured, Dev sign-in would be off; keep it for linking tests.
    dev = auth.oauth.dev_issuer(idp)
    monkeypatch.setattr(
        auth.oauth,
        "sign_in_providers",
        lambda settings: [*auth.oauth.configured_providers(settings), dev],
    )
    yield s
    s.db.dispose()
    get_settings.cache_clear()


def count(db: Database, table: sa.Table) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def session_cookie(response: Response) -> str:
    header = response.headers["set-cookie"]
    match = re.search(r"aicredits_session=([^;]+)", header)
    assert match, header
    return match.group(1)


# --- happy paths -------------------------------------------------------------------------------


def test_first_sign_in_creates_the_user_with_a_trial_and_lands_where_they_asked(
    site: Site,
) -> None:
    response = site.sign_in("alice@example.test", next_path="/credits?tab=history")
    assert response.status_code == 303
    assert response.headers["location"] == f"{PUBLIC}/credits?tab=history"
    cookie_header = response.headers["set-cookie"]
    assert "HttpOnly" in cookie_header
    assert "SameSite=lax" in cookie_header or "samesite=lax" in cookie_header.lower()
    assert "Path=/" in cookie_header
    assert "Secure" not in cookie_header  # plain http in development

    token = session_cookie(response)
    user = auth.resolve_session(site.db, site.settings, token)
    assert user is not None and user.email == "alice@example.test"
    assert ledger.get_balance(site.db, user_id=user.id).balance == TRIAL
    with site.db.read() as conn:
        stored = conn.execute(sa.select(auth_sessions.c.token_hash)).scalar_one()
        trial = conn.execute(sa.select(ledger_entries.c.reason, ledger_entries.c.kind)).one()
    assert token not in stored  # only the hash is kept
    assert (trial.kind, trial.reason) == ("grant", "free trial")
    assert ledger.expiring_credits(site.db, user_id=user.id)[0][1] == TRIAL


def test_signing_in_again_gives_a_new_token_but_no_second_user_or_trial(site: Site) -> None:
    first = session_cookie(site.sign_in("alice@example.test"))
    second = session_cookie(site.sign_in("alice@example.test"))
    assert first != second
    assert count(site.db, users) == 1
    assert count(site.db, ledger_entries) == 1
    assert count(site.db, auth_sessions) == 2


def test_a_second_provider_with_the_same_verified_email_is_the_same_user(
    strict_site: Site,
) -> None:
    strict_site.set_claims("alice-sso", email="alice@example.test", email_verified=True)
    via_dev = session_cookie(strict_site.sign_in("alice@example.test", provider="dev"))
    via_sso = session_cookie(strict_site.sign_in("alice-sso", provider="oidc"))
    a = auth.resolve_session(strict_site.db, strict_site.settings, via_dev)
    b = auth.resolve_session(strict_site.db, strict_site.settings, via_sso)
    assert a is not None and b is not None and a.id == b.id
    assert count(strict_site.db, users) == 1
    assert count(strict_site.db, identities) == 2
    assert count(strict_site.db, ledger_entries) == 1  # one trial, ever


def test_an_unverified_email_is_refused_and_creates_nothing(strict_site: Site) -> None:
    strict_site.set_claims("mallory", email="mallory@example.test", email_verified=False)
    response = strict_site.sign_in("mallory", provider="oidc")
    assert response.status_code == 403
    assert "no verified email" in response.text
    assert "aicredits_session" not in response.headers.get("set-cookie", "")
    assert count(strict_site.db, users) == 0


def test_an_unverified_email_never_links_to_an_existing_account(strict_site: Site) -> None:
    strict_site.sign_in("alice@example.test", provider="dev")
    strict_site.set_claims("impostor", email="alice@example.test", email_verified=False)
    response = strict_site.sign_in("impostor", provider="oidc")
    assert response.status_code == 403
    assert count(strict_site.db, identities) == 1


def test_admins_come_from_admin_emails(site: Site) -> None:
    admin = auth.resolve_session(
        site.db, site.settings, session_cookie(site.sign_in("admin@example.test"))
    )
    plain = auth.resolve_session(
        site.db, site.settings, session_cookie(site.sign_in("bob@example.test"))
    )
    assert admin is not None and admin.is_admin
    assert plain is not None and not plain.is_admin


# --- the state parameter -----------------------------------------------------------------------


def test_a_replayed_callback_is_refused(site: Site) -> None:
    callback = site.approve(site.start(), "alice@example.test")
    assert site.callback(callback).status_code == 303
    replay = site.callback(callback)
    assert replay.status_code == 400
    assert "already used" in replay.text
    assert count(site.db, auth_sessions) == 1


def test_a_callback_in_another_browser_is_refused(site: Site) -> None:
    callback = site.approve(site.start(), "alice@example.test")
    other_browser = TestClient(site.client.app, follow_redirects=False)
    response = site.callback(callback, client=other_browser)
    assert response.status_code == 400
    assert count(site.db, users) == 0


@pytest.mark.parametrize("query", ["code=abc", "code=abc&state=not-a-real-state", ""])
def test_a_missing_or_unknown_state_is_refused(site: Site, query: str) -> None:
    site.start()  # this browser has a binder cookie, but not for this state
    response = site.client.get(f"/auth/callback/dev?{query}")
    assert response.status_code == 400
    assert count(site.db, users) == 0


def test_an_expired_state_is_refused(site: Site) -> None:
    callback = site.approve(site.start(), "alice@example.test")
    with site.db.transaction() as conn:
        conn.execute(sa.update(login_attempts).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert site.callback(callback).status_code == 400
    assert count(site.db, users) == 0


def test_a_state_for_another_provider_is_refused(strict_site: Site) -> None:
    callback = strict_site.approve(strict_site.start("dev"), "alice@example.test")
    swapped = callback.replace("/auth/callback/dev", "/auth/callback/oidc")
    assert strict_site.callback(swapped).status_code == 400
    assert count(strict_site.db, users) == 0


# --- the code and the ID token -----------------------------------------------------------------


def test_a_wrong_nonce_in_the_id_token_is_refused(site: Site) -> None:
    callback = site.approve(site.start(), "alice@example.test")
    with site.db.transaction() as conn:  # as if the token had been minted for another request
        conn.execute(sa.update(login_attempts).values(nonce="some-other-nonce"))
    response = site.callback(callback)
    assert response.status_code == 400
    assert "could not be verified" in response.text
    assert count(site.db, users) == 0


def test_a_forged_code_is_refused(site: Site) -> None:
    callback = site.approve(site.start(), "alice@example.test")
    forged = re.sub(r"code=[^&]+", "code=forged-code", callback)
    response = site.callback(forged)
    assert response.status_code == 400
    assert "did not accept" in response.text
    assert count(site.db, users) == 0


def test_a_replayed_code_is_refused(site: Site) -> None:
    first = site.approve(site.start(), "alice@example.test")
    assert site.callback(first).status_code == 303
    old_code = parse_qs(urlsplit(first).query)["code"][0]
    second = site.approve(site.start(), "alice@example.test")
    replayed = re.sub(r"code=[^&]+", f"code={old_code}", second)
    assert site.callback(replayed).status_code == 400
    assert count(site.db, auth_sessions) == 1


def test_an_error_from_the_provider_is_shown_and_creates_nothing(site: Site) -> None:
    authorization_url = site.start()
    denied = httpx.post(authorization_url, data={"action": "deny"})
    location = urlsplit(denied.headers["location"])
    assert "error=access_denied" in location.query
    response = site.callback(f"{location.path}?{location.query}")
    assert response.status_code == 400
    assert "did not sign you in" in response.text
    assert count(site.db, users) == 0


def test_unknown_providers_get_404(site: Site) -> None:
    assert site.client.post("/auth/login/nope", headers={"Origin": PUBLIC}).status_code == 404
    assert site.client.get("/auth/callback/nope?state=x&code=y").status_code == 404


# --- the routes themselves ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "evil", ["//evil.example", "https://evil.example", "/\\evil.example", "/\\/evil.example"]
)
def test_next_cannot_send_the_user_off_site(site: Site, evil: str) -> None:
    response = site.sign_in("alice@example.test", next_path=evil)
    assert response.headers["location"] == f"{PUBLIC}/chat"


def test_starting_a_sign_in_is_never_a_get(site: Site) -> None:
    # A GET (a bookmark, a prefetch, a link from another site) only lands on the sign-in page.
    response = site.client.get("/auth/login/dev")
    assert (response.status_code, response.headers["location"]) == (303, f"{PUBLIC}/login")
    assert count(site.db, login_attempts) == 0


def test_starting_a_sign_in_from_another_site_is_refused(site: Site) -> None:
    response = site.client.post(
        "/auth/login/dev", data={"next": "/chat"}, headers={"Origin": "https://evil.example"}
    )
    assert response.status_code == 403
    assert count(site.db, login_attempts) == 0


def test_the_pkce_challenge_is_s256_and_the_redirect_uri_exact(site: Site) -> None:
    query = parse_qs(urlsplit(site.start()).query)
    assert query["code_challenge_method"] == ["S256"]
    assert len(query["code_challenge"][0]) == 43
    assert query["redirect_uri"] == ["http://testserver/auth/callback/dev"]
    assert query["nonce"][0] and query["state"][0]


def test_sign_out_revokes_the_session_on_the_server(site: Site) -> None:
    token = session_cookie(site.sign_in("alice@example.test"))
    response = site.client.post("/auth/logout", headers={"Origin": PUBLIC})
    assert response.status_code == 303
    assert response.headers["location"] == f"{PUBLIC}/"
    assert 'aicredits_session=""' in response.headers["set-cookie"]
    assert auth.resolve_session(site.db, site.settings, token) is None


def test_sign_out_from_another_site_is_refused(site: Site) -> None:
    token = session_cookie(site.sign_in("alice@example.test"))
    response = site.client.post("/auth/logout", headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert auth.resolve_session(site.db, site.settings, token) is not None


def test_https_sites_use_secure_host_prefixed_cookies_and_hsts(
    db_url: str, idp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make_site(db_url, idp, monkeypatch, PUBLIC_URL="https://app.example.com")
    try:
        start = s.client.post(
            "/auth/login/dev", data={"next": "/chat"}, headers={"Origin": "https://app.example.com"}
        )
        assert "strict-transport-security" in start.headers
        assert start.headers["set-cookie"].startswith("__Host-aicredits_login=")
        assert "Secure" in start.headers["set-cookie"]
        # The test client speaks http, so it would not send a Secure cookie back; pass it on.
        binder = re.search(r"__Host-aicredits_login=([^;]+)", start.headers["set-cookie"])
        assert binder
        callback = s.approve(start.headers["location"], "alice@example.test")
        s.client.cookies.set("__Host-aicredits_login", binder.group(1))
        done = s.callback(callback)
        assert done.status_code == 303
        assert done.headers["set-cookie"].startswith("__Host-aicredits_session=")
        assert "Secure" in done.headers["set-cookie"]
    finally:
        s.db.dispose()
        get_settings.cache_clear()


# --- sessions ----------------------------------------------------------------------------------


def test_a_suspended_user_is_out_at_the_next_request_and_cannot_sign_in(site: Site) -> None:
    token = session_cookie(site.sign_in("alice@example.test"))
    user = auth.resolve_session(site.db, site.settings, token)
    assert user is not None
    users_service.set_suspended(site.db, user_id=user.id, suspended=True)
    assert auth.resolve_session(site.db, site.settings, token) is None
    again = site.sign_in("alice@example.test")
    assert again.status_code == 403
    assert "suspended" in again.text


def test_expired_tampered_and_unknown_tokens_resolve_to_nobody(site: Site) -> None:
    token = session_cookie(site.sign_in("alice@example.test"))
    assert auth.resolve_session(site.db, site.settings, token) is not None
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert auth.resolve_session(site.db, site.settings, tampered) is None
    assert auth.resolve_session(site.db, site.settings, "") is None
    assert auth.resolve_session(site.db, site.settings, "x" * 500) is None
    later = utcnow() + timedelta(days=site.settings.session_days, seconds=1)
    assert auth.resolve_session(site.db, site.settings, token, now=later) is None


def test_the_trial_is_given_once_whatever_happens(site: Site) -> None:
    token = session_cookie(site.sign_in("alice@example.test"))
    user = auth.resolve_session(site.db, site.settings, token)
    assert user is not None
    for _ in range(3):
        assert not auth.ensure_trial_grant(site.db, site.settings, user_id=user.id)
    assert ledger.get_balance(site.db, user_id=user.id).balance == TRIAL


# --- free trials per client address -----------------------------------------------------------


@pytest.fixture
def make(db_url: str, idp: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    made: list[Site] = []

    def build(**env: str) -> Site:
        made.append(make_site(db_url, idp, monkeypatch, **env))
        return made[-1]

    yield build
    for s in made:
        s.db.dispose()
    get_settings.cache_clear()


def new_account(site: Site, client: TestClient) -> tuple[int, int]:
    """Sign up a new user from this browser: (user id, balance)."""
    response = site.sign_in(f"new-{uuid.uuid4().hex[:10]}@example.test", client=client)
    assert response.status_code == 303, response.text
    user = auth.resolve_session(site.db, site.settings, session_cookie(response))
    assert user is not None
    return user.id, ledger.get_balance(site.db, user_id=user.id).balance


def test_the_sign_up_past_the_limit_gets_no_trial_and_the_reason(make: Any) -> None:
    site = make(TRIALS_PER_ADDRESS_PER_DAY="3")
    home = site.peer("203.0.113.5")
    accounts = [new_account(site, home) for _ in range(4)]
    assert [credits for _, credits in accounts] == [TRIAL, TRIAL, TRIAL, 0]
    refused = accounts[3][0]
    assert trials.trial_notice(site.db, user_id=refused) == (
        "No free trial for this account: 3 accounts already got one from your network "
        "today. Buy credits to start."
    )
    # Another address is unaffected.
    assert new_account(site, site.peer("198.51.100.7"))[1] == TRIAL


def test_signing_in_again_counts_nothing_against_the_address(make: Any) -> None:
    site = make(TRIALS_PER_ADDRESS_PER_DAY="2")
    home = site.peer("203.0.113.5")
    for _ in range(3):
        assert site.sign_in("regular@example.test", client=home).status_code == 303
    assert count(site.db, users) == 1
    assert new_account(site, home)[1] == TRIAL  # the second of two
    assert new_account(site, home)[1] == 0


def test_behind_a_trusted_proxy_trials_count_per_forwarded_address(make: Any) -> None:
    site = make(TRIALS_PER_ADDRESS_PER_DAY="1", TRUSTED_PROXIES="10.0.0.1")
    via_proxy = [site.peer("10.0.0.1", forwarded=a) for a in ("203.0.113.5", "203.0.113.6")]
    assert new_account(site, via_proxy[0])[1] == TRIAL
    assert new_account(site, via_proxy[0])[1] == 0
    assert new_account(site, via_proxy[1])[1] == TRIAL
    # A peer that is not the proxy cannot pick its address with the header.
    spoofing = [site.peer("198.51.100.9", forwarded=a) for a in ("192.0.2.1", "192.0.2.2")]
    assert new_account(site, spoofing[0])[1] == TRIAL
    assert new_account(site, spoofing[1])[1] == 0


@pytest.mark.parametrize("path", ["/auth/login/dev", "/auth/login/google", "/auth/logout"])
def test_a_get_on_a_sign_in_or_out_route_lands_on_the_sign_in_page(site: Site, path: str) -> None:
    response = site.client.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == f"{site.settings.public_url}/login"
