"""Personal API keys: how programs call the OpenAI-compatible API as their user.

* A key is `aic_` and 256 random bits (URL-safe base64). It is shown to its user once, when
  it is made; the database keeps only its SHA-256 and its first 12 characters (the prefix,
  so the user can tell keys apart). A leaked database leaks no usable key.
* A key works until it is revoked, by its user or by suspending the user (which revokes
  every key of theirs in the same transaction). Resolution checks the key, its revocation and
  the user's suspension on every call, so revoking takes effect at once in the process that
  revoked it. Each worker remembers a resolved key for at most KEY_CACHE_SECONDS (one
  second), so it reaches every other worker within that second; see `cached_user`.
* A user has at most MAX_ACTIVE_KEYS unrevoked keys; creating one locks the user's row, so
  two concurrent creates cannot both slip under the limit (nor past a suspension).
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeGuard

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from aicredits.adapters.db import Database
from aicredits.adapters.tables import api_keys, users, utcnow
from aicredits.domain.errors import AICreditsError, InvalidRequest, UnknownUser
from aicredits.domain.identity import is_admin
from aicredits.services.auth import LAST_USED_GRANULARITY, CurrentUser
from aicredits.services.token_hashing import hash_token
from aicredits.settings import Settings

KEY_PREFIX = "aic_"
MAX_ACTIVE_KEYS = 20
MAX_NAME_LENGTH = 60
SHOWN_PREFIX_LENGTH = 12  # "aic_" and 8 random characters
_SECRET_BYTES = 32
# secrets.token_urlsafe(32) is 43 characters of [A-Za-z0-9_-] (base64 without padding).
KEY_LENGTH = len(KEY_PREFIX) + 43
_KEY_SHAPE = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The id column is a 32-bit INTEGER on Postgres: a larger number is no key, not a DB error.
_MAX_ID = 2**31 - 1

# A resolved key's user, remembered per process (and per database) for this long: the metered
# path then skips a database round trip and a thread hop on nearly every call. Bounded, not
# invalidated across processes: a revocation or suspension made elsewhere reaches this
# worker when the entry lapses, within the second. One made in this process clears them at
# once (after its commit; a call resolving at that very moment may still remember its user,
# for at most the same second).
KEY_CACHE_SECONDS = 1.0
_KEY_CACHE_MAX = 10_000
_key_cache: dict[tuple[str, str], tuple[float, CurrentUser]] = {}


class UnknownApiKey(AICreditsError):
    code = "unknown_api_key"


@dataclass(frozen=True, slots=True)
class ApiKeyView:
    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class NewApiKey:
    key: ApiKeyView
    secret: str = field(repr=False)  # the full key, shown once; kept out of reprs and logs


_VIEW_COLUMNS = (
    api_keys.c.id,
    api_keys.c.name,
    api_keys.c.prefix,
    api_keys.c.created_at,
    api_keys.c.last_used_at,
    api_keys.c.revoked_at,
)


def _view(row: Row[*tuple[Any, ...]]) -> ApiKeyView:
    return ApiKeyView(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def clean_key_name(name: str | None) -> str:
    """The name as stored: trimmed, required, at most MAX_NAME_LENGTH characters."""
    cleaned = (name or "").strip()
    if not cleaned:
        raise InvalidRequest("Give the key a name, so you can recognise it later.")
    if len(cleaned) > MAX_NAME_LENGTH:
        raise InvalidRequest(
            f"A key name can have at most {MAX_NAME_LENGTH} characters "
            f"(this one has {len(cleaned)})."
        )
    if _CONTROL.search(cleaned):
        raise InvalidRequest("A key name cannot contain line breaks or control characters.")
    return cleaned


def is_well_formed(raw_key: str | None) -> TypeGuard[str]:
    """Whether this could be a key we issued (checked before any database work)."""
    if not raw_key or len(raw_key) != KEY_LENGTH:  # also refuses anything over-long
        return False
    return _KEY_SHAPE.fullmatch(raw_key) is not None


def create_api_key(
    db: Database, *, user_id: int, name: str, now: datetime | None = None
) -> NewApiKey:
    """A new key for this user. Its secret is in the result and nowhere else."""
    cleaned = clean_key_name(name)
    now = now or utcnow()
    secret = KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
    with db.transaction() as conn:
        # Lock the user's row: concurrent creates for one user (and a suspension) take turns,
        # so the active-key count below cannot go stale before the insert.
        suspended = conn.execute(
            sa.select(users.c.is_suspended).where(users.c.id == user_id).with_for_update()
        ).scalar_one_or_none()
        if suspended is None:
            raise UnknownUser(f"no user {user_id}")
        if suspended:
            raise InvalidRequest("This account is suspended, so it cannot create API keys.")
        active = conn.execute(
            sa.select(sa.func.count())
            .select_from(api_keys)
            .where(api_keys.c.user_id == user_id, api_keys.c.revoked_at.is_(None))
        ).scalar_one()
        if active >= MAX_ACTIVE_KEYS:
            raise InvalidRequest(
                f"You already have {MAX_ACTIVE_KEYS} active keys, the most allowed. "
                "Revoke one you no longer use, then create a new one."
            )
        row = conn.execute(
            sa.insert(api_keys)
            .values(
                user_id=user_id,
                name=cleaned,
                prefix=secret[:SHOWN_PREFIX_LENGTH],
                key_hash=hash_token(secret),
                created_at=now,
            )
            .returning(*_VIEW_COLUMNS)
        ).one()
    return NewApiKey(key=_view(row), secret=secret)


def list_api_keys(db: Database, *, user_id: int) -> list[ApiKeyView]:
    """This user's keys, newest first, revoked ones included."""
    with db.read() as conn:
        rows = conn.execute(
            sa.select(*_VIEW_COLUMNS)
            .where(api_keys.c.user_id == user_id)
            .order_by(api_keys.c.created_at.desc(), api_keys.c.id.desc())
        ).all()
    return [_view(row) for row in rows]


def revoke_api_key(
    db: Database, *, user_id: int, key_id: int, now: datetime | None = None
) -> ApiKeyView:
    """Revoke one of this user's keys, at once. Revoking it again changes nothing.

    Another user's key (or no key) is UnknownApiKey, whichever it is, and is left alone.
    """
    if not 0 < key_id <= _MAX_ID:
        raise UnknownApiKey("There is no such API key.")
    mine = sa.and_(api_keys.c.id == key_id, api_keys.c.user_id == user_id)
    with db.transaction() as conn:
        conn.execute(
            sa.update(api_keys)
            .where(mine, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now or utcnow())
        )
        row = conn.execute(sa.select(*_VIEW_COLUMNS).where(mine)).first()
    forget_cached_keys()
    if row is None:
        raise UnknownApiKey("There is no such API key.")
    return _view(row)


def forget_cached_keys() -> None:
    """Drop every remembered key of this process (after a revocation made here)."""
    _key_cache.clear()


def revoke_user_keys(conn: Connection, *, user_id: int, now: datetime) -> int:
    """Revoke every active key of a user inside the caller's transaction (for suspension)."""
    forget_cached_keys()  # before the commit too: harmless, and nothing re-caches it after
    result = conn.execute(
        sa.update(api_keys)
        .where(api_keys.c.user_id == user_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount)


def revoke_all_api_keys(db: Database, *, user_id: int, now: datetime | None = None) -> int:
    """Revoke every active key of this user. Returns how many were active."""
    with db.transaction() as conn:
        revoked = revoke_user_keys(conn, user_id=user_id, now=now or utcnow())
    forget_cached_keys()
    return revoked


def cached_user(db: Database, raw_key: str | None) -> CurrentUser | None:
    """The user of a key this process resolved less than KEY_CACHE_SECONDS ago, else None.
    No I/O, so the caller needs no thread; on None it calls resolve_api_key."""
    if not is_well_formed(raw_key):
        return None
    entry = _key_cache.get((db.url, hash_token(raw_key)))
    if entry is None or entry[0] <= time.monotonic():
        return None
    return entry[1]


def _remember(db: Database, key_hash: str, user: CurrentUser, *, until: float) -> None:
    if len(_key_cache) >= _KEY_CACHE_MAX:
        now = time.monotonic()
        for cache_key in [k for k, (until, _) in _key_cache.items() if until <= now]:
            _key_cache.pop(cache_key, None)
        if len(_key_cache) >= _KEY_CACHE_MAX:
            _key_cache.clear()
    _key_cache[(db.url, key_hash)] = (until, user)


def resolve_api_key(
    db: Database, settings: Settings, raw_key: str | None, *, now: datetime | None = None
) -> CurrentUser | None:
    """The user a key acts for, or None if it is malformed, unknown, revoked, or its user is
    suspended. Records its use at most every LAST_USED_GRANULARITY. Remembers the answer for
    `cached_user` (only a user: an unknown or revoked key is looked up every time)."""
    if not is_well_formed(raw_key):
        return None
    now = now or utcnow()
    key_hash = hash_token(raw_key)
    # Read before the query: an entry is never younger than what it was read from.
    cache_until = time.monotonic() + KEY_CACHE_SECONDS
    with db.read() as conn:
        row = conn.execute(
            sa.select(
                api_keys.c.id,
                api_keys.c.last_used_at,
                users.c.id.label("user_id"),
                users.c.email,
                users.c.email_verified,
                users.c.name,
                users.c.avatar_url,
            )
            .select_from(api_keys.join(users, users.c.id == api_keys.c.user_id))
            .where(
                api_keys.c.key_hash == key_hash,
                api_keys.c.revoked_at.is_(None),
                users.c.is_suspended.is_(False),
            )
        ).first()
    if row is None:
        return None
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_GRANULARITY:
        stale = now - LAST_USED_GRANULARITY
        with db.transaction() as conn:
            # Conditional, so many concurrent calls with one key write it once.
            conn.execute(
                sa.update(api_keys)
                .where(
                    api_keys.c.id == row.id,
                    sa.or_(api_keys.c.last_used_at.is_(None), api_keys.c.last_used_at < stale),
                )
                .values(last_used_at=now)
            )
            conn.execute(sa.update(users).where(users.c.id == row.user_id).values(last_seen_at=now))
    user = _current_user(row, settings)
    _remember(db, key_hash, user, until=cache_until)
    return user


def _current_user(row: Row[*tuple[Any, ...]], settings: Settings) -> CurrentUser:
    return CurrentUser(
        id=row.user_id,
        email=row.email,
        name=row.name,
        avatar_url=row.avatar_url,
        is_admin=is_admin(
            row.email, email_verified=row.email_verified, admin_emails=settings.admin_emails
        ),
    )
