"""Who is signed in, for plain HTTP routes (the Reflex State has its own, in state/session)."""

from __future__ import annotations

from starlette.requests import Request

from aicredits.adapters import logs
from aicredits.services import auth, cookies
from aicredits.services.auth import CurrentUser
from aicredits.services.runtime import get_database, run_blocking
from aicredits.settings import Settings


async def signed_in_user(request: Request, settings: Settings) -> CurrentUser | None:
    token = request.cookies.get(cookies.cookie_name(settings, cookies.SESSION))
    user = await run_blocking(auth.resolve_session, get_database(), settings, token)
    logs.set_user_id(user.id if user else None)
    return user
