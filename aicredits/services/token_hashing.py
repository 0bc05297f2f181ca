"""How session tokens, sign-in states and API keys are stored: HMAC-SHA256 under the
session secret, so a copy of the database alone cannot check a guessed or leaked token.

Every process of one deployment must hash alike (the app's workers, the operator's
commands, the tests' helpers), so the key comes from the process's settings: SESSION_SECRET,
or in development a secret made once into .data/session_secret. Changing it signs everyone
out and invalidates every API key.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from aicredits.adapters.local_secret import LOCAL_DATA_DIR, load_or_create_secret
from aicredits.domain.identity import token_hash
from aicredits.settings import Settings, get_settings

DEV_SESSION_SECRET_PATH = LOCAL_DATA_DIR / "session_secret"


def hashing_key(settings: Settings) -> bytes:
    secret = settings.session_secret.get_secret_value()
    if secret:
        return secret.encode()
    if settings.environment == "prod":
        # Never reached through the app: production refuses to start without it.
        raise RuntimeError("SESSION_SECRET is required in production")
    return _dev_key(DEV_SESSION_SECRET_PATH)


@lru_cache(maxsize=4)
def _dev_key(path: Path) -> bytes:
    return load_or_create_secret(path).encode()


def hash_token(token: str) -> str:
    """The stored form of `token`, keyed for this deployment."""
    return token_hash(token, key=hashing_key(get_settings()))
