"""The admin console's commands: adjust a balance, grant credits, suspend or restore a user,
clear a flag; and the audit log they write.

Every action writes one row to the append-only audit log (`admin_actions`) saying who, when,
to whom, what and why. The row is keyed by the submitted form's token (a random value put in
the form when it is rendered), so the same submission sent twice is one action and one row.

Each action and its audit row are one transaction: the ledger write (keyed `admin:{token}`),
the suspension or the cleared flag commits with its row, or neither does. A form already
submitted returns its first result; a submission of the same form at the same moment finds
the token taken when it writes its row, rolls back and returns the first result.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database, insert_ignoring_conflict
from aicredits.adapters.tables import account_flags, admin_actions, ledger_entries, users, utcnow
from aicredits.domain.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    UnknownUser,
)
from aicredits.domain.ledger import EntryKind, require_nonzero, require_positive, require_reason
from aicredits.services import ledger, thresholds
from aicredits.services import users as users_service
from aicredits.services.ledger import EntryResult
from aicredits.settings import Settings

# A form token is made by new_form_token(); anything else is refused before it keys money.
_FORM_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,100}$")
# Far beyond any real correction, and well inside BIGINT: a typo of extra digits is refused.
MAX_ADMIN_CREDITS = 10**12
MAX_GRANT_DAYS = 3650


# --- who acts, and what they may do -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminActor:
    """The signed-in admin, as the state resolved them on the server for this event."""

    user_id: int
    email: str

    @property
    def ledger_actor(self) -> str:
        return f"admin:{self.email}"[:200]


class ActionKind(StrEnum):
    ADJUST_BALANCE = "adjust_balance"
    GRANT_CREDITS = "grant_credits"
    SUSPEND = "suspend"
    UNSUSPEND = "unsuspend"
    CLEAR_FLAG = "clear_flag"
    ADD_PRICE = "add_price"
    CLEAR_UNMATCHED = "clear_unmatched"
    RUN_RECONCILIATION = "run_reconciliation"


class AdminError(InvalidRequest):
    """An admin action that cannot go ahead. The message is safe to show."""

    code = "admin_refused"


class InvalidFormToken(AdminError):
    code = "invalid_form_token"


class FormAlreadyUsed(AdminError):
    """The form's token already did something else: a replay must repeat the same action."""

    code = "form_already_used"


_FORM_USED = "This form was already used for another action. Reload the page and try again."


class CannotSuspendSelf(AdminError):
    code = "cannot_suspend_self"


class UnknownFlag(AdminError):
    code = "unknown_flag"


class FlagAlreadyCleared(AdminError):
    code = "flag_already_cleared"


class InvalidEffectiveDate(AdminError):
    code = "invalid_effective_date"


def new_form_token() -> str:
    """A fresh token for one rendered form; submitting it twice is one action."""
    return secrets.token_urlsafe(24)


def require_form_token(token: str | None) -> str:
    text = (token or "").strip()
    if not _FORM_TOKEN.match(text):
        raise InvalidFormToken("This form has expired. Reload the page and try again.")
    return text


def ledger_key(form_token: str) -> str:
    return f"admin:{form_token}"


# --- the audit log ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActionResult:
    audit_id: int
    action: str
    target_user_id: int | None
    detail: str
    # True when this form had already been submitted: nothing changed now.
    replayed: bool


class _FormRecordedMeanwhile(Exception):
    """A concurrent submission of the same form wrote its audit row first. Raised inside the
    transaction to roll back everything this one wrote; the first result is returned."""

    def __init__(self, action: ActionKind, target_user_id: int | None) -> None:
        super().__init__(action.value)
        self.action = action
        self.target_user_id = target_user_id


def _action_by_token(conn: Connection, token: str) -> Any:
    return conn.execute(
        sa.select(admin_actions).where(admin_actions.c.idempotency_key == token)
    ).first()


def _replayed(row: Any, action: ActionKind, target_user_id: int | None) -> ActionResult:
    if (row.action, row.target_user_id) != (action.value, target_user_id):
        raise FormAlreadyUsed(_FORM_USED)
    return ActionResult(
        audit_id=row.id,
        action=row.action,
        target_user_id=row.target_user_id,
        detail=row.detail,
        replayed=True,
    )


def once_per_form(
    db: Database, token: str, act: Callable[[Connection], ActionResult]
) -> ActionResult:
    """Run `act`, an action with its audit row, as one transaction. When a submission of the
    same form running at the same moment records it first, everything `act` wrote is rolled
    back and the first result is returned."""
    try:
        with db.transaction() as conn:
            return act(conn)
    except _FormRecordedMeanwhile as taken:
        with db.read() as conn:
            return _replayed(_action_by_token(conn, token), taken.action, taken.target_user_id)


def earlier_use(
    conn: Connection, token: str, action: ActionKind, target_user_id: int | None
) -> ActionResult | None:
    """The first result of this form when it was submitted before; None when it was not."""
    row = _action_by_token(conn, token)
    return None if row is None else _replayed(row, action, target_user_id)


def record_action(
    conn: Connection,
    *,
    actor: AdminActor,
    action: ActionKind,
    target_user_id: int | None,
    detail: str,
    reason: str,
    token: str,
    now: datetime,
) -> ActionResult:
    """Write the audit row of an action, in the action's own transaction. When a submission of
    the same form got there first, everything is rolled back and once_per_form replays it."""
    row = conn.execute(
        insert_ignoring_conflict(conn.dialect.name, admin_actions, index="idempotency_key")
        .values(
            actor_user_id=actor.user_id,
            actor_email=actor.email[:320],
            action=action.value,
            target_user_id=target_user_id,
            detail=detail,
            reason=reason,
            idempotency_key=token,
            created_at=now,
        )
        .returning(admin_actions.c.id)
    ).first()
    if row is None:
        raise _FormRecordedMeanwhile(action, target_user_id)
    return ActionResult(
        audit_id=int(row.id),
        action=action.value,
        target_user_id=target_user_id,
        detail=detail,
        replayed=False,
    )


# --- balance actions --------------------------------------------------------------------------


def _entry_by_key(conn: Connection, key: str) -> Any:
    return conn.execute(
        sa.select(ledger_entries).where(ledger_entries.c.idempotency_key == key)
    ).first()


def _require_same_entry(entry: Any, *, kind: EntryKind, user_id: int, credits: int) -> None:
    """A replayed form must ask for exactly what its first submission did."""
    if entry is None or (entry.user_id, entry.kind, entry.amount) != (user_id, kind.value, credits):
        raise FormAlreadyUsed(_FORM_USED)


def _ledger_action(
    db: Database,
    *,
    actor: AdminActor,
    action: ActionKind,
    kind: EntryKind,
    user_id: int,
    credits: int,
    reason: str,
    token: str,
    now: datetime,
    apply: Callable[[Connection, str], EntryResult],
    describe: Callable[[int, int], str],
) -> ActionResult:
    """A balance change and its audit row, committed together once per form token."""
    key = ledger_key(token)

    def act(conn: Connection) -> ActionResult:
        first = earlier_use(conn, token, action, user_id)
        if first is not None:
            _require_same_entry(
                _entry_by_key(conn, key), kind=kind, user_id=user_id, credits=credits
            )
            return first
        entry: Any
        try:
            entry = apply(conn, key)
        except InsufficientCredits:
            # The ledger checks the balance before the key, so a submission of this form that
            # already took the credits (at the same moment, on Postgres) shows up as
            # insufficient: the form's key says whether it was applied.
            entry = _entry_by_key(conn, key)
            if entry is None:
                raise
        except IdempotencyConflict:
            raise FormAlreadyUsed(_FORM_USED) from None
        _require_same_entry(entry, kind=kind, user_id=user_id, credits=credits)
        return record_action(
            conn,
            actor=actor,
            action=action,
            target_user_id=user_id,
            detail=describe(entry.amount, entry.balance_after),
            reason=reason,
            token=token,
            now=now,
        )

    return once_per_form(db, token, act)


def adjust_balance(
    db: Database,
    *,
    actor: AdminActor,
    user_id: int,
    credits: int,
    reason: str,
    form_token: str,
    settings: Settings | None = None,
    now: datetime | None = None,
) -> ActionResult:
    """A signed correction of a balance, with a reason. It can never take the balance below
    zero or below what is held: the ledger refuses, and nothing is written. With `settings`,
    the usage warnings a debit crosses are recorded (and emailed) at once."""
    now = now or utcnow()
    token = require_form_token(form_token)
    reason = require_reason(reason)
    require_nonzero(credits)
    if abs(credits) > MAX_ADMIN_CREDITS:
        raise AdminError("The amount is too large.")

    def apply(conn: Connection, key: str) -> EntryResult:
        return ledger.adjust(
            conn,
            user_id=user_id,
            credits=credits,
            key=key,
            actor=actor.ledger_actor,
            reason=reason,
            reference=f"admin:{actor.user_id}",
            now=now,
        )

    result = _ledger_action(
        db,
        actor=actor,
        action=ActionKind.ADJUST_BALANCE,
        kind=EntryKind.ADJUSTMENT,
        user_id=user_id,
        credits=credits,
        reason=reason,
        token=token,
        now=now,
        apply=apply,
        describe=lambda amount, after: f"adjusted by {amount:+,} credits; balance {after:,}",
    )
    if settings is not None and credits < 0:
        thresholds.record_crossings(db, settings, user_id=user_id, now=now)
    return result


def grant_credits(
    db: Database,
    *,
    actor: AdminActor,
    user_id: int,
    credits: int,
    reason: str,
    form_token: str,
    expires_in_days: int | None = None,
    now: datetime | None = None,
) -> ActionResult:
    """Promotional credits, optionally expiring after some days (spent first, like a trial)."""
    now = now or utcnow()
    token = require_form_token(form_token)
    reason = require_reason(reason)
    require_positive(credits)
    if credits > MAX_ADMIN_CREDITS:
        raise AdminError("The amount is too large.")
    if expires_in_days is not None and not 1 <= expires_in_days <= MAX_GRANT_DAYS:
        raise AdminError(f"Expiry must be from 1 to {MAX_GRANT_DAYS} days.")
    expires_at = now + timedelta(days=expires_in_days) if expires_in_days else None
    until = f", expiring {utc_minute(expires_at)}" if expires_at else ", not expiring"

    def apply(conn: Connection, key: str) -> EntryResult:
        return ledger.grant(
            conn,
            user_id=user_id,
            credits=credits,
            key=key,
            reason=reason,
            expires_at=expires_at,
            actor=actor.ledger_actor,
            kind=EntryKind.GRANT,
            reference=f"admin:{actor.user_id}",
            now=now,
        )

    return _ledger_action(
        db,
        actor=actor,
        action=ActionKind.GRANT_CREDITS,
        kind=EntryKind.GRANT,
        user_id=user_id,
        credits=credits,
        reason=reason,
        token=token,
        now=now,
        apply=apply,
        describe=lambda amount, after: f"granted {amount:,} credits{until}; balance {after:,}",
    )


# --- suspension and flags ---------------------------------------------------------------------


def set_suspension(
    db: Database,
    *,
    actor: AdminActor,
    user_id: int,
    suspended: bool,
    reason: str,
    form_token: str,
    now: datetime | None = None,
) -> ActionResult:
    """Suspend (revoking every session and API key) or restore a user. Restoring lets them
    sign in again; it brings back neither sessions nor keys. Nobody suspends themself."""
    now = now or utcnow()
    token = require_form_token(form_token)
    reason = require_reason(reason)
    action = ActionKind.SUSPEND if suspended else ActionKind.UNSUSPEND
    if suspended and user_id == actor.user_id:
        raise CannotSuspendSelf("You cannot suspend your own account.")

    def act(conn: Connection) -> ActionResult:
        first = earlier_use(conn, token, action, user_id)
        if first is not None:
            return first
        was = conn.execute(sa.select(users.c.is_suspended).where(users.c.id == user_id)).first()
        if was is None:
            raise UnknownUser(f"no user {user_id}")
        users_service.set_suspended(conn, user_id=user_id, suspended=suspended)
        if suspended:
            detail = "suspended; every session and API key revoked"
        else:
            detail = "unsuspended; the user can sign in again"
        if bool(was.is_suspended) == suspended:
            detail += " (it already was)"
        return record_action(
            conn,
            actor=actor,
            action=action,
            target_user_id=user_id,
            detail=detail,
            reason=reason,
            token=token,
            now=now,
        )

    return once_per_form(db, token, act)


def clear_flag(
    db: Database,
    *,
    actor: AdminActor,
    flag_id: int,
    note: str,
    form_token: str,
    now: datetime | None = None,
) -> ActionResult:
    """Mark a flag (refund shortfall, dispute) as looked at, with a note. It stays on record."""
    now = now or utcnow()
    token = require_form_token(form_token)
    note = require_reason(note)

    def act(conn: Connection) -> ActionResult:
        flag = conn.execute(sa.select(account_flags).where(account_flags.c.id == flag_id)).first()
        if flag is None:
            raise UnknownFlag("There is no such flag.")
        first = earlier_use(conn, token, ActionKind.CLEAR_FLAG, flag.user_id)
        if first is not None:
            return first
        detail = f"cleared {flag.kind} flag #{flag.id}"
        if flag.amount:
            detail += f" ({flag.amount:,} credits)"
        # The audit row first: a submission of this form at the same moment waits on it and
        # replays, rather than finding the flag cleared.
        result = record_action(
            conn,
            actor=actor,
            action=ActionKind.CLEAR_FLAG,
            target_user_id=flag.user_id,
            detail=detail,
            reason=note,
            token=token,
            now=now,
        )
        cleared = conn.execute(
            sa.update(account_flags)
            .where(account_flags.c.id == flag_id, account_flags.c.cleared_at.is_(None))
            .values(cleared_at=now, cleared_by=actor.email[:200], clear_note=note)
        )
        if cleared.rowcount != 1:
            raise FlagAlreadyCleared("This flag was already cleared.")
        return result

    return once_per_form(db, token, act)


def utc_minute(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else ""
