"""Sign-in routes. Each parses the request, calls one service, and answers with a redirect or
a plain error page; none of them trusts the browser beyond the cookies it checks.

POST /auth/login/{provider}     start (a form post: nothing changes state on GET)
GET  /auth/callback/{provider}  the provider sends the browser back here
POST /auth/logout               revoke the session on the server and clear the cookie
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from aicredits.api.small_pages import message_page
from aicredits.domain.errors import answer_for
from aicredits.services import auth, cookies
from aicredits.services.runtime import get_database
from aicredits.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def _set_cookie(
    response: Response, settings: Settings, base: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        cookies.cookie_name(settings, base),
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        secure=settings.https,
        samesite="lax",
    )


def _clear_cookie(response: Response, settings: Settings, base: str) -> None:
    response.delete_cookie(
        cookies.cookie_name(settings, base),
        path="/",
        httponly=True,
        secure=settings.https,
        samesite="lax",
    )


# The HTTP status of each refused sign-in (its most specific class listed here wins).
SIGN_IN_STATUS: dict[type[auth.SignInError], int] = {
    auth.UnknownProvider: 404,
    auth.EmailNotVerified: 403,
    auth.AccountSuspended: 403,
    auth.SignInError: 400,
}


def error_page(settings: Settings, *, title: str, message: str, status: int) -> HTMLResponse:
    """The callback runs outside the Reflex frontend: a small page of its own."""
    return message_page(
        settings, title=title, message=message, status=status, back_path="/login",
        back_label="Back to sign-in",
    )  # fmt: skip


async def to_sign_in_page(_request: Request) -> Response:
    """Signing in and out change state, so they are POSTs from our pages' forms; a link or a
    typed address that GETs them lands on the sign-in page instead of a bare 404/405."""
    return RedirectResponse(f"{get_settings().public_url}/login", status_code=303)


async def login(request: Request) -> Response:
    settings = get_settings()
    form = await request.form()
    next_path = form.get("next")
    try:
        start = await auth.start_login(
            get_database(),
            settings,
            provider_name=request.path_params["provider"],
            next_path=next_path if isinstance(next_path, str) else None,
        )
    except auth.SignInError as exc:
        return error_page(
            settings,
            title="Cannot sign in",
            message=exc.message,
            status=answer_for(SIGN_IN_STATUS, exc),
        )
    response = RedirectResponse(start.authorization_url, status_code=303)
    _set_cookie(response, settings, cookies.LOGIN_BINDER, start.binder, cookies.BINDER_MAX_AGE)
    return response


async def callback(request: Request) -> Response:
    settings = get_settings()
    params = request.query_params
    try:
        signed_in = await auth.finish_login(
            get_database(),
            settings,
            provider_name=request.path_params["provider"],
            state=params.get("state"),
            code=params.get("code"),
            error=params.get("error"),
            binder=request.cookies.get(cookies.cookie_name(settings, cookies.LOGIN_BINDER)),
            user_agent=request.headers.get("user-agent", ""),
            # The real client behind a trusted proxy (api/proxies.py): what the free trial's
            # limit per address counts.
            client_address=request.client.host if request.client else None,
        )
    except auth.SignInError as exc:
        logger.info("sign-in refused: %s (%s)", exc.code, request.path_params["provider"])
        response: Response = error_page(
            settings,
            title="Sign-in failed",
            message=exc.message,
            status=answer_for(SIGN_IN_STATUS, exc),
        )
        _clear_cookie(response, settings, cookies.LOGIN_BINDER)
        return response
    response = RedirectResponse(settings.public_url + signed_in.next_path, status_code=303)
    _set_cookie(
        response,
        settings,
        cookies.SESSION,
        signed_in.session_token,
        settings.session_days * 86_400,
    )
    _clear_cookie(response, settings, cookies.LOGIN_BINDER)
    return response


async def logout(request: Request) -> Response:
    settings = get_settings()
    token = request.cookies.get(cookies.cookie_name(settings, cookies.SESSION))
    auth.revoke_session(get_database(), token)
    response = RedirectResponse(settings.public_url + "/", status_code=303)
    _clear_cookie(response, settings, cookies.SESSION)
    return response


routes = [
    Route("/auth/login/{provider}", login, methods=["POST"]),
    Route("/auth/login/{provider}", to_sign_in_page, methods=["GET"]),
    Route("/auth/callback/{provider}", callback, methods=["GET"]),
    Route("/auth/logout", logout, methods=["POST"]),
    Route("/auth/logout", to_sign_in_page, methods=["GET"]),
]
