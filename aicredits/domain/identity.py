"""Pure identity rules: where a sign-in may land, who is an admin, how tokens are stored."""

from __future__ import annotations

import hashlib
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


def token_hash(token: str) -> str:
    """What the database keeps of a session token or a sign-in state: never the value itself.

    The tokens are 256-bit random values, so a plain SHA-256 is enough (no salt or slow hash:
    there is nothing to guess).
    """
    return hashlib.sha256(token.encode()).hexdigest()
