"""Users and their credit accounts. Sign-in (later) creates users through `create_user`."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database, unit_of_work
from aicredits.adapters.tables import auth_sessions, credit_accounts, users, utcnow
from aicredits.domain.errors import InvalidRequest, UnknownUser
from aicredits.services.api_keys import forget_cached_keys, revoke_user_keys


@dataclass(frozen=True, slots=True)
class UserView:
    id: int
    email: str | None
    name: str
    is_suspended: bool


def create_user(
    db: Database, *, email: str | None, name: str = "", email_verified: bool = False
) -> UserView:
    """Create a user and their (empty) credit account in one transaction."""
    email = email.strip().lower() if email else None
    now = utcnow()
    with db.transaction() as conn:
        user_id = conn.execute(
            sa.insert(users)
            .values(
                email=email,
                email_verified=email_verified,
                name=name,
                is_suspended=False,
                created_at=now,
            )
            .returning(users.c.id)
        ).scalar_one()
        conn.execute(
            sa.insert(credit_accounts).values(user_id=user_id, balance=0, held=0, created_at=now)
        )
    return UserView(id=user_id, email=email, name=name, is_suspended=False)


def find_user_by_email(db: Database, *, email: str) -> UserView:
    """The one user with this email. Several users may share an unverified email; then refuse."""
    wanted = email.strip().lower()
    if not wanted:
        raise InvalidRequest("an email is required")
    with db.read() as conn:
        rows = conn.execute(
            sa.select(users.c.id, users.c.email, users.c.name, users.c.is_suspended).where(
                sa.func.lower(users.c.email) == wanted
            )
        ).all()
    if not rows:
        raise UnknownUser(f"no user with email {wanted}")
    if len(rows) > 1:
        ids = ", ".join(str(r.id) for r in rows)
        raise InvalidRequest(f"several users have email {wanted} (ids {ids}); use --user-id")
    r = rows[0]
    return UserView(id=r.id, email=r.email, name=r.name, is_suspended=r.is_suspended)


def set_suspended(target: Database | Connection, *, user_id: int, suspended: bool) -> None:
    """Suspend or restore a user. Suspending ends every session at its next request and
    revokes every API key, in one transaction (the caller's, given its connection);
    restoring brings neither back."""
    with unit_of_work(target) as conn:
        changed = conn.execute(
            sa.update(users).where(users.c.id == user_id).values(is_suspended=suspended)
        )
        if changed.rowcount != 1:
            raise UnknownUser(f"no user {user_id}")
        if suspended:
            now = utcnow()
            conn.execute(
                sa.update(auth_sessions)
                .where(auth_sessions.c.user_id == user_id, auth_sessions.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            revoke_user_keys(conn, user_id=user_id, now=now)
    if suspended:
        forget_cached_keys()  # again after the commit: see api_keys.KEY_CACHE_SECONDS
