"""Pure identity rules: where a sign-in may land, who is an admin, how tokens are stored."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

DEFAULT_LANDING = "/chat"
MAX_NEXT_LENGTH = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_next_path(candidate: str | None, default: str = DEFAULT_LANDING) -> str:
    """A post-sign-in destination that can only be a path on this site.

    Anything else (another host, a scheme, `//host`, `/\\host`, control characters, an
    over-long value) falls back to `default`, so the sign-in is never an open redirect.
    """
    if not candidate or len(candidate) > MAX_NEXT_LENGTH:
        return default
    if not candidate.startswith("/") or candidate.startswith(("//", "/\\")):
        return default
    if "\\" in candidate or _CONTROL.search(candidate):
        return default
    parts = urlsplit(candidate)
    if parts.scheme or parts.netloc:
        return default
    return candidate


def normalise_email(email: str | None) -> str | None:
    text = (email or "").strip().lower()
    return text or None


def is_admin(email: str | None, *, email_verified: bool, admin_emails: Iterable[str]) -> bool:
    """Admins are configured by email; only a verified email counts."""
    wanted = normalise_email(email)
    if not wanted or not email_verified:
        return False
    return wanted in {e for e in (normalise_email(a) for a in admin_emails) if e}


def token_hash(token: str, *, key: bytes) -> str:
    """What the database keeps of a session token, a sign-in state or an API key: never the
    value itself.

    The tokens are 256-bit random values, so no salt or slow hash is needed (there is nothing
    to guess). The HMAC key (the deployment's session secret) means a stolen copy of the
    database alone cannot confirm a token either.
    """
    if not key:
        raise ValueError("token_hash needs a non-empty key")
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()
