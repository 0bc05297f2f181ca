"""The app's cookies: names and attributes in one place, for the routes and the State."""

from __future__ import annotations

from aicredits.settings import Settings

SESSION = "aicredits_session"
LOGIN_BINDER = "aicredits_login"
BINDER_MAX_AGE = 600


def cookie_name(settings: Settings, base: str) -> str:
    # Over https the __Host- prefix makes the browser refuse the cookie unless it is Secure,
    # host-only and Path=/, so no sibling subdomain can plant or shadow it.
    return f"__Host-{base}" if settings.https else base


def read_cookie(cookie_header: str | None, name: str) -> str | None:
    """One cookie's value from a raw Cookie header (the websocket handshake's, for State).

    Parsed by hand: http.cookies gives up on the whole header when any other cookie on the
    host is malformed.
    """
    for part in (cookie_header or "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            value = value.strip().strip('"')
            return value or None
    return None
