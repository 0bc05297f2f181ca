"""Talking to identity providers: Authlib for the OAuth 2.0 code flow with PKCE, joserfc for
ID tokens. Nothing here decides who may sign in; that is services.auth.

Two kinds of provider:
* `oidc`: Google, the local dev issuer, or any issuer by discovery URL. The ID token is
  verified (signature against the issuer's JWKS, iss, aud, exp, nonce).
* `github`: plain OAuth 2.0. The verified primary email comes from `/user/emails`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import httpx2
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2 import OAuth2Error
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from aicredits.settings import Settings

HTTP_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
METADATA_TTL_SECONDS = 3600
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


class ProviderFailure(Exception):
    """The provider refused or failed (bad or replayed code, network, malformed answer)."""


class InvalidIdToken(Exception):
    """The ID token did not verify: signature, issuer, audience, expiry or nonce."""


@dataclass(frozen=True, slots=True)
class Provider:
    name: str  # in URLs: /auth/login/<name>
    label: str  # on the button: "Sign in with <label>"
    kind: Literal["oidc", "github"]
    client_id: str
    client_secret: str = field(repr=False)
    discovery_url: str = ""
    scopes: str = "openid email profile"
    # Only the local dev issuer: its made-up test users have no verified-email claim.
    assume_verified_email: bool = False
    authorize_url: str = ""
    token_url: str = ""
    api_url: str = ""


@dataclass(frozen=True, slots=True)
class ProviderIdentity:
    subject: str
    email: str | None
    email_verified: bool
    name: str
    picture: str | None


GITHUB_AUTHORIZE = "https://github.com/login/oauth/authorize"
GITHUB_TOKEN = "https://github.com/login/oauth/access_token"  # noqa: S105 - a URL
GITHUB_API = "https://api.github.com"
GOOGLE_DISCOVERY = "https://accounts.google.com/.well-known/openid-configuration"


def google(client_id: str, client_secret: str) -> Provider:
    return Provider("google", "Google", "oidc", client_id, client_secret, GOOGLE_DISCOVERY)


def github(client_id: str, client_secret: str) -> Provider:
    return Provider(
        "github",
        "GitHub",
        "github",
        client_id,
        client_secret,
        scopes="read:user user:email",
        authorize_url=GITHUB_AUTHORIZE,
        token_url=GITHUB_TOKEN,
        api_url=GITHUB_API,
    )


def generic_oidc(
    name: str, label: str, issuer_or_discovery: str, cid: str, secret: str
) -> Provider:
    return Provider(name, label, "oidc", cid, secret, discovery_url(issuer_or_discovery))


def dev_issuer(issuer: str) -> Provider:
    return Provider(
        "dev",
        "Dev sign-in",
        "oidc",
        "aicredits-dev",
        "aicredits-dev-secret",  # the local mock accepts any client; not a secret
        discovery_url(issuer),
        assume_verified_email=True,
    )


def discovery_url(issuer_or_url: str) -> str:
    url = issuer_or_url.rstrip("/")
    if url.endswith("/.well-known/openid-configuration"):
        return url
    return url + "/.well-known/openid-configuration"


# --- discovery and keys, cached per process -----------------------------------------------------

_metadata_cache: dict[str, tuple[float, dict[str, Any]]] = {}


async def _get_json(url: str) -> dict[str, Any]:
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            response = await client.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
            data = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ProviderFailure(f"could not read {url}: {exc}") from exc
    if not isinstance(data, dict):
        raise ProviderFailure(f"{url} did not return a JSON object")
    return data


async def metadata(provider: Provider, *, refresh: bool = False) -> dict[str, Any]:
    cached = _metadata_cache.get(provider.discovery_url)
    if cached and not refresh and time.monotonic() - cached[0] < METADATA_TTL_SECONDS:
        return cached[1]
    data = await _get_json(provider.discovery_url)
    for key in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri"):
        if not isinstance(data.get(key), str):
            raise ProviderFailure(f"discovery document lacks {key}")
    _metadata_cache[provider.discovery_url] = (time.monotonic(), data)
    return data


async def _keys(jwks_uri: str, *, refresh: bool) -> KeySet:
    cached = _metadata_cache.get(jwks_uri)
    if cached and not refresh and time.monotonic() - cached[0] < METADATA_TTL_SECONDS:
        data = cached[1]
    else:
        data = await _get_json(jwks_uri)
        _metadata_cache[jwks_uri] = (time.monotonic(), data)
    try:
        return KeySet.import_key_set(data)  # type: ignore[arg-type]
    except (JoseError, ValueError, TypeError) as exc:
        raise ProviderFailure(f"bad JWKS at {jwks_uri}") from exc


# --- the flow ------------------------------------------------------------------------------------


def _client(provider: Provider, redirect_uri: str) -> AsyncOAuth2Client:
    return AsyncOAuth2Client(
        client_id=provider.client_id,
        client_secret=provider.client_secret,
        scope=provider.scopes,
        redirect_uri=redirect_uri,
        code_challenge_method="S256",
        timeout=10.0,  # Authlib's client wants a number here, not an httpx.Timeout
    )


async def authorization_url(
    provider: Provider, *, redirect_uri: str, state: str, nonce: str, code_verifier: str
) -> str:
    """Where to send the browser: with state, a PKCE S256 challenge and, for OIDC, a nonce."""
    if provider.kind == "oidc":
        endpoint = (await metadata(provider))["authorization_endpoint"]
        extra: dict[str, str] = {"nonce": nonce}
    else:
        endpoint, extra = provider.authorize_url, {}
    async with _client(provider, redirect_uri) as client:
        url, _ = client.create_authorization_url(
            endpoint, state=state, code_verifier=code_verifier, **extra
        )
    return str(url)


async def fetch_identity(
    provider: Provider, *, redirect_uri: str, code: str, code_verifier: str, nonce: str
) -> ProviderIdentity:
    """Exchange the code (with the PKCE verifier) and learn who signed in."""
    if provider.kind == "oidc":
        return await _oidc_identity(provider, redirect_uri, code, code_verifier, nonce)
    return await _github_identity(provider, redirect_uri, code, code_verifier)


async def _exchange(
    client: AsyncOAuth2Client, token_url: str, code: str, code_verifier: str
) -> dict[str, Any]:
    try:
        token = await client.fetch_token(
            token_url,
            grant_type="authorization_code",
            code=code,
            code_verifier=code_verifier,
            headers={"Accept": "application/json"},
        )
    except (OAuthError, OAuth2Error, httpx.HTTPError, httpx2.HTTPError, ValueError) as exc:
        raise ProviderFailure(f"the provider refused the code: {exc}") from exc
    if not isinstance(token, dict) or "access_token" not in token:
        raise ProviderFailure("the provider returned no access token")
    return dict(token)


async def _oidc_identity(
    provider: Provider, redirect_uri: str, code: str, code_verifier: str, nonce: str
) -> ProviderIdentity:
    meta = await metadata(provider)
    async with _client(provider, redirect_uri) as client:
        token = await _exchange(client, meta["token_endpoint"], code, code_verifier)
    raw = token.get("id_token")
    if not isinstance(raw, str):
        raise InvalidIdToken("the provider returned no ID token")
    claims = await verify_id_token(
        raw, issuer=meta["issuer"], client_id=provider.client_id, nonce=nonce, meta=meta
    )
    # Some issuers put email and name only in userinfo.
    if "email" not in claims and isinstance(meta.get("userinfo_endpoint"), str):
        claims = {**await _userinfo(meta["userinfo_endpoint"], token), **claims}
    verified = claims.get("email_verified") in (True, "true")
    return ProviderIdentity(
        subject=str(claims["sub"]),
        email=claims.get("email") if isinstance(claims.get("email"), str) else None,
        email_verified=verified or provider.assume_verified_email,
        name=str(claims.get("name") or claims.get("email") or ""),
        picture=claims.get("picture") if isinstance(claims.get("picture"), str) else None,
    )


async def verify_id_token(
    raw: str, *, issuer: str, client_id: str, nonce: str, meta: dict[str, Any]
) -> dict[str, Any]:
    keys = await _keys(meta["jwks_uri"], refresh=False)
    try:
        try:
            decoded = jwt.decode(raw, keys, algorithms=ID_TOKEN_ALGORITHMS)
        except JoseError:
            # The issuer may have rotated its keys since we cached them.
            keys = await _keys(meta["jwks_uri"], refresh=True)
            decoded = jwt.decode(raw, keys, algorithms=ID_TOKEN_ALGORITHMS)
        registry = jwt.JWTClaimsRegistry(
            leeway=60,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": client_id},
            sub={"essential": True},
            exp={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        registry.validate(decoded.claims)
    except JoseError as exc:
        raise InvalidIdToken(f"the ID token did not verify: {exc.error}") from exc
    claims = dict(decoded.claims)
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if len(audiences) > 1 and claims.get("azp") != client_id:
        raise InvalidIdToken("the ID token was issued to another party (azp)")
    return claims


async def _userinfo(url: str, token: dict[str, Any]) -> dict[str, Any]:
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            response = await client.get(
                url, headers={"Authorization": f"Bearer {token['access_token']}"}
            )
            response.raise_for_status()
            data = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ProviderFailure(f"userinfo failed: {exc}") from exc
    return data if isinstance(data, dict) else {}


async def _github_identity(
    provider: Provider, redirect_uri: str, code: str, code_verifier: str
) -> ProviderIdentity:
    async with _client(provider, redirect_uri) as client:
        token = await _exchange(client, provider.token_url, code, code_verifier)
    headers = {
        "Authorization": f"Bearer {token['access_token']}",
        "Accept": "application/vnd.github+json",
    }
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, base_url=provider.api_url) as api:
            user_response = await api.get("/user", headers=headers)
            user_response.raise_for_status()
            emails_response = await api.get("/user/emails", headers=headers)
            emails_response.raise_for_status()
            user, emails = user_response.json(), emails_response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ProviderFailure(f"GitHub API failed: {exc}") from exc
    primary = next(
        (e for e in emails if isinstance(e, dict) and e.get("primary") and e.get("verified")),
        None,
    )
    return ProviderIdentity(
        subject=str(user["id"]),
        email=primary["email"] if primary else None,
        email_verified=primary is not None,
        name=str(user.get("name") or user.get("login") or ""),
        picture=user.get("avatar_url"),
    )


def configured_providers(settings: Settings) -> list[Provider]:
    """The sign-in providers the operator configured (each needs its id and secret)."""
    providers = []
    if settings.google_client_id and settings.google_client_secret:
        providers.append(google(settings.google_client_id, settings.google_client_secret))
    if settings.github_client_id and settings.github_client_secret:
        providers.append(github(settings.github_client_id, settings.github_client_secret))
    if settings.oidc_issuer and settings.oidc_client_id and settings.oidc_client_secret:
        providers.append(
            generic_oidc(
                "oidc",
                settings.oidc_label,
                settings.oidc_issuer,
                settings.oidc_client_id,
                settings.oidc_client_secret,
            )
        )
    return providers


def sign_in_providers(settings: Settings) -> list[Provider]:
    """The configured providers; with none, the local dev issuer (development only)."""
    providers = configured_providers(settings)
    if not providers and settings.environment == "dev":
        providers.append(dev_issuer(settings.dev_oidc_issuer))
    return providers
