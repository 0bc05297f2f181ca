"""GitHub sign-in: the code exchange with PKCE, and the email taken only from a verified,
primary address in /user/emails. GitHub itself is stood in for by a small local server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aicredits.adapters import oauth
from tests.servers import serve_asgi

EMAILS: list[dict[str, Any]] = []
SEEN: dict[str, Any] = {}


async def token(request: Request) -> JSONResponse:
    form = await request.form()
    SEEN.update(form)
    if form.get("code") != "good-code" or not form.get("code_verifier"):
        return JSONResponse({"error": "bad_verification_code"})  # GitHub answers 200 here
    return JSONResponse({"access_token": "gho_test", "token_type": "bearer"})


async def user(request: Request) -> JSONResponse:
    assert request.headers["authorization"] == "Bearer gho_test"
    return JSONResponse({"id": 4242, "login": "octo", "name": None, "avatar_url": "https://a/x"})


async def emails(_request: Request) -> JSONResponse:
    return JSONResponse(EMAILS)


@pytest.fixture(scope="module")
def github() -> Iterator[oauth.Provider]:
    app = Starlette(
        routes=[
            Route("/login/oauth/access_token", token, methods=["POST"]),
            Route("/user", user),
            Route("/user/emails", emails),
        ]
    )
    with serve_asgi(app, ready_path="/user/emails") as base:
        real = oauth.github("client-id", "client-secret")
        yield oauth.Provider(
            **{
                **{f: getattr(real, f) for f in real.__dataclass_fields__},
                "authorize_url": f"{base}/login/oauth/authorize",
                "token_url": f"{base}/login/oauth/access_token",
                "api_url": base,
            }
        )


def identity(provider: oauth.Provider, code: str = "good-code") -> oauth.ProviderIdentity:
    return asyncio.run(
        oauth.fetch_identity(
            provider, redirect_uri="http://x/cb", code=code, code_verifier="v" * 50, nonce="n"
        )
    )


def test_the_verified_primary_email_is_used(github: oauth.Provider) -> None:
    EMAILS[:] = [
        {"email": "old@example.com", "primary": False, "verified": True},
        {"email": "octo@example.com", "primary": True, "verified": True},
    ]
    found = identity(github)
    assert (found.subject, found.email, found.email_verified) == ("4242", "octo@example.com", True)
    assert found.name == "octo"  # falls back to the login when GitHub has no name
    assert SEEN["code_verifier"] == "v" * 50


def test_an_unverified_primary_email_counts_as_none(github: oauth.Provider) -> None:
    EMAILS[:] = [
        {"email": "octo@example.com", "primary": True, "verified": False},
        {"email": "other@example.com", "primary": False, "verified": True},
    ]
    found = identity(github)
    assert (found.email, found.email_verified) == (None, False)


def test_a_bad_code_is_a_provider_failure(github: oauth.Provider) -> None:
    with pytest.raises(oauth.ProviderFailure):
        identity(github, code="forged")


def test_the_authorization_url_carries_state_and_s256_pkce(github: oauth.Provider) -> None:
    url = asyncio.run(
        oauth.authorization_url(
            github, redirect_uri="http://x/cb", state="st", nonce="n", code_verifier="v" * 50
        )
    )
    assert "state=st" in url
    assert "code_challenge_method=S256" in url
    assert "nonce" not in url  # GitHub is not OpenID Connect
