"""The admin console's use cases: find users, look into an account, act on it, watch the money.

Every action writes one row to the append-only audit log (`admin_actions`) saying who, when,
to whom, what and why. The row is keyed by the submitted form's token (a random value put in
the form when it is rendered), so the same submission sent twice is one action and one row:

* Clearing a flag and adding a price run in one transaction with their audit row: the audit
  row is inserted first (ON CONFLICT DO NOTHING); a replay finds it taken and rolls back.
* Balance changes go through the ledger, which opens its own transaction. The ledger entry's
  key is derived from the same token (`admin:{token}`) and the audit row is written right
  after it. A replay finds the audit row (or, after a crash between the two, the ledger
  entry) and returns the first result; nothing is applied twice, and a retry of the same
  form completes a missing audit row. The entry itself carries the admin and the reason.
* Suspension goes through `users.set_suspended` (which also revokes sessions and keys), then
  the audit row, with the same replay rule.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from fractions import Fraction
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database
from aicredits.adapters.tables import (
    account_flags,
    admin_actions,
    credit_accounts,
    holds,
    ledger_entries,
    model_prices,
    trial_addresses,
    usage_events,
    users,
    utcnow,
)
from aicredits.domain.errors import (
    AICreditsError,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    UnknownModel,
    UnknownUser,
)
from aicredits.domain.ledger import (
    EntryKind,
    require_non_negative,
    require_nonzero,
    require_positive,
    require_reason,
)
from aicredits.services import ledger
from aicredits.services import users as users_service
from aicredits.services.ledger import EntryResult
from aicredits.services.purchases import PurchaseView, list_purchases
from aicredits.settings import Settings

PER_PAGE = 25
# A form token is made by new_form_token(); anything else is refused before it keys money.
_FORM_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,100}$")
# Far beyond any real correction, and well inside BIGINT: a typo of extra digits is refused.
MAX_ADMIN_CREDITS = 10**12
MAX_GRANT_DAYS = 3650
MAX_PRICE_PER_MTOK = 10**12
SPIKE_BASELINE_HOURS = 7 * 24
# The overview lists at most this many (address, day) rows that reached the trial limit.
MAX_LIMITED_ADDRESSES = 200


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


class AdminError(InvalidRequest):
    """An admin action that cannot go ahead. The message is safe to show."""

    code = "admin_refused"


class InvalidFormToken(AdminError):
    code = "invalid_form_token"


class FormAlreadyUsed(AdminError):
    """The form's token already did something else: a replay must repeat the same action."""

    code = "form_already_used"


class CannotSuspendSelf(AdminError):
    code = "cannot_suspend_self"


class UnknownFlag(AdminError):
    code = "unknown_flag"


class FlagAlreadyCleared(AdminError):
    code = "flag_already_cleared"


class InvalidEffectiveDate(AdminError):
    code = "invalid_effective_date"


def describe_error(exc: AICreditsError) -> str:
    """One sentence an admin can act on, for any error the admin services raise."""
    if isinstance(exc, InsufficientCredits):
        return (
            "Refused: a balance can never go below zero, nor below what running calls hold. "
            f"{exc.needed:,} credits to take, {exc.available:,} available."
        )
    if isinstance(exc, IdempotencyConflict):
        return "This form was already used for another action. Reload the page and try again."
    if isinstance(exc, UnknownUser):
        return "There is no such user."
    text = str(exc)
    return text[:1].upper() + text[1:] if text else "The action was refused."


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


# --- parsing form input -----------------------------------------------------------------------


def parse_credits(text: object, *, what: str = "the amount") -> int:
    """A whole number of credits as typed: "-40", "+1,000", "2 500". Never a float."""
    raw = str(text if text is not None else "").strip()
    cleaned = raw.replace(",", "").replace("_", "").replace(" ", "")
    if cleaned.startswith("+"):
        cleaned = cleaned[1:]
    body = cleaned[1:] if cleaned.startswith("-") else cleaned
    if not body.isdigit() or not body.isascii():
        raise AdminError(f"Enter {what} as a whole number of credits.")
    if len(body) > 13 or abs(int(cleaned)) > MAX_ADMIN_CREDITS:
        raise AdminError(f"{what[:1].upper() + what[1:]} is too large.")
    return int(cleaned)


def parse_optional_days(text: object) -> int | None:
    raw = str(text if text is not None else "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not raw.isascii() or not 1 <= int(raw) <= MAX_GRANT_DAYS:
        raise AdminError(f"Expiry must be a whole number of days from 1 to {MAX_GRANT_DAYS}.")
    return int(raw)


def parse_id(text: object, *, what: str = "user") -> int:
    raw = str(text if text is not None else "").strip()
    if not raw.isdigit() or not raw.isascii() or len(raw) > 18:
        raise AdminError(f"There is no such {what}.")
    return int(raw)


def parse_effective_from(text: object, *, now: datetime | None = None) -> datetime | None:
    """A date and time from the form (UTC, "YYYY-MM-DDTHH:MM"), or None for "now"."""
    raw = str(text if text is not None else "").strip()
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidEffectiveDate("Enter the date and time as YYYY-MM-DD HH:MM (UTC).") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


# --- the audit log ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActionResult:
    audit_id: int
    action: str
    target_user_id: int | None
    detail: str
    # True when this form had already been submitted: nothing changed now.
    replayed: bool


class _Replay(Exception):
    """The form token is taken; raised inside a transaction to roll it back."""


def _action_by_token(conn: Connection, token: str) -> Any:
    return conn.execute(
        sa.select(admin_actions).where(admin_actions.c.idempotency_key == token)
    ).first()


def _find_action(db: Database, token: str) -> Any:
    with db.read() as conn:
        return _action_by_token(conn, token)


def _replayed(row: Any, action: ActionKind, target_user_id: int | None) -> ActionResult:
    if (row.action, row.target_user_id) != (action.value, target_user_id):
        raise FormAlreadyUsed(
            "This form was already used for another action. Reload the page and try again."
        )
    return ActionResult(
        audit_id=row.id,
        action=row.action,
        target_user_id=row.target_user_id,
        detail=row.detail,
        replayed=True,
    )


def _insert_action(
    db: Database,
    conn: Connection,
    *,
    actor: AdminActor,
    action: ActionKind,
    target_user_id: int | None,
    detail: str,
    reason: str,
    token: str,
    now: datetime,
) -> int | None:
    """The audit row, or None when this token already has one."""
    row = conn.execute(
        db.insert_ignoring_conflict(admin_actions, index="idempotency_key")
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
    return None if row is None else int(row.id)


def _record(
    db: Database,
    *,
    actor: AdminActor,
    action: ActionKind,
    target_user_id: int | None,
    detail: str,
    reason: str,
    token: str,
    now: datetime,
) -> ActionResult:
    """Write the audit row of an action already applied (by its own service's transaction)."""
    with db.transaction() as conn:
        audit_id = _insert_action(
            db,
            conn,
            actor=actor,
            action=action,
            target_user_id=target_user_id,
            detail=detail,
            reason=reason,
            token=token,
            now=now,
        )
        if audit_id is None:  # the same form, submitted concurrently, recorded it first
            return _replayed(_action_by_token(conn, token), action, target_user_id)
    return ActionResult(
        audit_id=audit_id,
        action=action.value,
        target_user_id=target_user_id,
        detail=detail,
        replayed=False,
    )


# --- balance actions --------------------------------------------------------------------------


def _entry_by_key(db: Database, key: str) -> Any:
    with db.read() as conn:
        return conn.execute(
            sa.select(ledger_entries).where(ledger_entries.c.idempotency_key == key)
        ).first()


def _require_same_entry(entry: Any, *, kind: EntryKind, user_id: int, credits: int) -> None:
    """A replayed form must ask for exactly what its first submission did."""
    if entry is None or (entry.user_id, entry.kind, entry.amount) != (user_id, kind.value, credits):
        raise FormAlreadyUsed(
            "This form was already used for another action. Reload the page and try again."
        )


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
    apply: Callable[[str], EntryResult],
    describe: Callable[[int, int], str],
) -> ActionResult:
    key = ledger_key(token)
    first = _find_action(db, token)
    if first is not None:
        replay = _replayed(first, action, user_id)
        _require_same_entry(_entry_by_key(db, key), kind=kind, user_id=user_id, credits=credits)
        return replay
    entry = _entry_by_key(db, key)  # applied, but the audit row never written (a crash)
    if entry is None:
        try:
            applied = apply(key)
        except InsufficientCredits:
            # A concurrent submission of this same form may have just taken the credits.
            entry = _entry_by_key(db, key)
            if entry is None:
                raise
        else:
            entry = applied
    _require_same_entry(entry, kind=kind, user_id=user_id, credits=credits)
    return _record(
        db,
        actor=actor,
        action=action,
        target_user_id=user_id,
        detail=describe(entry.amount, entry.balance_after),
        reason=reason,
        token=token,
        now=now,
    )


def adjust_balance(
    db: Database,
    *,
    actor: AdminActor,
    user_id: int,
    credits: int,
    reason: str,
    form_token: str,
    now: datetime | None = None,
) -> ActionResult:
    """A signed correction of a balance, with a reason. It can never take the balance below
    zero or below what is held: the ledger refuses, and nothing is written."""
    now = now or utcnow()
    token = require_form_token(form_token)
    reason = require_reason(reason)
    require_nonzero(credits)
    if abs(credits) > MAX_ADMIN_CREDITS:
        raise AdminError("The amount is too large.")

    def apply(key: str) -> EntryResult:
        return ledger.adjust(
            db,
            user_id=user_id,
            credits=credits,
            key=key,
            actor=actor.ledger_actor,
            reason=reason,
            reference=f"admin:{actor.user_id}",
            now=now,
        )

    return _ledger_action(
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
    until = f", expiring {_minute(expires_at)}" if expires_at else ", not expiring"

    def apply(key: str) -> EntryResult:
        return ledger.grant(
            db,
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
    first = _find_action(db, token)
    if first is not None:
        return _replayed(first, action, user_id)
    with db.read() as conn:
        was = conn.execute(sa.select(users.c.is_suspended).where(users.c.id == user_id)).first()
    if was is None:
        raise UnknownUser(f"no user {user_id}")
    users_service.set_suspended(db, user_id=user_id, suspended=suspended)
    if suspended:
        detail = "suspended; every session and API key revoked"
    else:
        detail = "unsuspended; the user can sign in again"
    if bool(was.is_suspended) == suspended:
        detail += " (it already was)"
    return _record(
        db,
        actor=actor,
        action=action,
        target_user_id=user_id,
        detail=detail,
        reason=reason,
        token=token,
        now=now,
    )


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
    try:
        with db.transaction() as conn:
            flag = conn.execute(
                sa.select(account_flags).where(account_flags.c.id == flag_id)
            ).first()
            if flag is None:
                raise UnknownFlag("There is no such flag.")
            flag_user_id: int = flag.user_id
            detail = f"cleared {flag.kind} flag #{flag.id}"
            if flag.amount:
                detail += f" ({flag.amount:,} credits)"
            audit_id = _insert_action(
                db,
                conn,
                actor=actor,
                action=ActionKind.CLEAR_FLAG,
                target_user_id=flag_user_id,
                detail=detail,
                reason=note,
                token=token,
                now=now,
            )
            if audit_id is None:
                raise _Replay
            cleared = conn.execute(
                sa.update(account_flags)
                .where(account_flags.c.id == flag_id, account_flags.c.cleared_at.is_(None))
                .values(cleared_at=now, cleared_by=actor.email[:200], clear_note=note)
            )
            if cleared.rowcount != 1:
                raise FlagAlreadyCleared("This flag was already cleared.")
    except _Replay:
        return _replayed(_find_action(db, token), ActionKind.CLEAR_FLAG, flag_user_id)
    return ActionResult(
        audit_id=audit_id,
        action=ActionKind.CLEAR_FLAG.value,
        target_user_id=flag_user_id,
        detail=detail,
        replayed=False,
    )


# --- prices -----------------------------------------------------------------------------------


def add_price(
    db: Database,
    *,
    actor: AdminActor,
    model: str,
    input_per_mtok: int,
    output_per_mtok: int,
    reason: str,
    form_token: str,
    known_models: Collection[str],
    effective_from: datetime | None = None,
    now: datetime | None = None,
) -> ActionResult:
    """A new price version for a model, from now or a later moment. Earlier versions stay,
    and every usage event keeps the version it was charged at.

    The row is written here rather than by pricing.add_price_version so that it and its
    audit row are one transaction: price rows carry no idempotency key of their own."""
    now = now or utcnow()
    token = require_form_token(form_token)
    reason = require_reason(reason)
    model = model.strip()
    if model not in known_models:
        raise UnknownModel(f"There is no model called {model!r} here.")
    for value, what in ((input_per_mtok, "input price"), (output_per_mtok, "output price")):
        require_non_negative(value, what)
        if value > MAX_PRICE_PER_MTOK:
            raise AdminError(f"The {what} is too large.")
    starts = effective_from or now
    if starts < now - timedelta(minutes=1):
        # A past start would change which price "was in force" for calls already charged.
        raise InvalidEffectiveDate("A new price cannot start in the past: choose now or later.")
    first = _find_action(db, token)
    if first is not None:
        return _replayed(first, ActionKind.ADD_PRICE, None)
    detail = (
        f"{model}: {input_per_mtok:,} input / {output_per_mtok:,} output credits per 1M tokens, "
        f"from {_minute(starts)}"
    )
    try:
        with db.transaction() as conn:
            audit_id = _insert_action(
                db,
                conn,
                actor=actor,
                action=ActionKind.ADD_PRICE,
                target_user_id=None,
                detail=detail,
                reason=reason,
                token=token,
                now=now,
            )
            if audit_id is None:
                raise _Replay
            conn.execute(
                sa.insert(model_prices).values(
                    model=model,
                    input_per_mtok=input_per_mtok,
                    output_per_mtok=output_per_mtok,
                    effective_from=starts,
                    created_at=now,
                    created_by=actor.ledger_actor,
                )
            )
    except _Replay:
        return _replayed(_find_action(db, token), ActionKind.ADD_PRICE, None)
    except sa.exc.IntegrityError:
        raise AdminError(
            f"{model} already has a price starting at exactly that moment; choose another."
        ) from None
    return ActionResult(
        audit_id=audit_id,
        action=ActionKind.ADD_PRICE.value,
        target_user_id=None,
        detail=detail,
        replayed=False,
    )


@dataclass(frozen=True, slots=True)
class PriceVersionView:
    version_id: int
    model: str
    input_per_mtok: int
    output_per_mtok: int
    effective_from: datetime
    created_at: datetime
    created_by: str
    status: str  # current | scheduled | past


@dataclass(frozen=True, slots=True)
class ModelPrices:
    model: str
    configured: bool
    current: PriceVersionView | None
    # Every version, newest start first.
    versions: list[PriceVersionView]


def list_prices(
    db: Database, *, configured_models: Sequence[str], now: datetime | None = None
) -> list[ModelPrices]:
    """Each model's price now and its whole history: configured models first, then any
    model that only the price table still knows."""
    now = now or utcnow()
    with db.read() as conn:
        rows = conn.execute(
            sa.select(model_prices).order_by(
                model_prices.c.model,
                model_prices.c.effective_from.desc(),
                model_prices.c.id.desc(),
            )
        ).all()
    by_model: dict[str, list[Any]] = {}
    for row in rows:
        by_model.setdefault(row.model, []).append(row)
    names = list(dict.fromkeys([*configured_models, *sorted(by_model)]))
    result = []
    for name in names:
        versions = by_model.get(name, [])
        # Rows are newest start first; the first that has started is in force.
        current_id = next((r.id for r in versions if r.effective_from <= now), None)
        views = [
            PriceVersionView(
                version_id=r.id,
                model=r.model,
                input_per_mtok=r.input_per_mtok,
                output_per_mtok=r.output_per_mtok,
                effective_from=r.effective_from,
                created_at=r.created_at,
                created_by=r.created_by,
                status=(
                    "current"
                    if r.id == current_id
                    else "scheduled"
                    if r.effective_from > now
                    else "past"
                ),
            )
            for r in versions
        ]
        result.append(
            ModelPrices(
                model=name,
                configured=name in configured_models,
                current=next((v for v in views if v.status == "current"), None),
                versions=views,
            )
        )
    return result


# --- users ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserSummary:
    id: int
    email: str | None
    name: str
    is_suspended: bool
    balance: int
    held: int
    total_purchased: int
    open_flags: tuple[str, ...]
    created_at: datetime
    last_activity: datetime | None

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass(frozen=True, slots=True)
class UserPage:
    users: list[UserSummary]
    total: int
    page: int
    pages: int
    query: str


def _pages(total: int, per_page: int) -> int:
    return max(1, -(-total // per_page))


def _user_filter(query: str) -> Any:
    q = query.strip()
    if not q:
        return sa.true()
    matches = [
        users.c.email.icontains(q, autoescape=True),
        users.c.name.icontains(q, autoescape=True),
    ]
    if q.isdigit() and q.isascii() and len(q) <= 18:
        matches.append(users.c.id == int(q))
    return sa.or_(*matches)


def _summaries(conn: Connection, rows: Sequence[Any]) -> list[UserSummary]:
    ids = [r.id for r in rows]
    if not ids:
        return []
    purchased = dict(
        conn.execute(
            sa.select(ledger_entries.c.user_id, sa.func.sum(ledger_entries.c.amount))
            .where(
                ledger_entries.c.user_id.in_(ids),
                ledger_entries.c.kind == EntryKind.PURCHASE.value,
            )
            .group_by(ledger_entries.c.user_id)
        ).all()
    )
    last_usage = dict(
        conn.execute(
            sa.select(usage_events.c.user_id, sa.func.max(usage_events.c.created_at))
            .where(usage_events.c.user_id.in_(ids))
            .group_by(usage_events.c.user_id)
        ).all()
    )
    flags: dict[int, list[str]] = {}
    for user_id, kind in conn.execute(
        sa.select(account_flags.c.user_id, account_flags.c.kind)
        .where(account_flags.c.user_id.in_(ids), account_flags.c.cleared_at.is_(None))
        .order_by(account_flags.c.id)
    ):
        if kind not in flags.setdefault(user_id, []):
            flags[user_id].append(kind)
    result = []
    for r in rows:
        # SQLite's func.max() on a TypeDecorator column comes back as text.
        usage_at = _as_utc(last_usage.get(r.id))
        seen = [m for m in (r.last_seen_at, usage_at) if m is not None]
        result.append(
            UserSummary(
                id=r.id,
                email=r.email,
                name=r.name,
                is_suspended=bool(r.is_suspended),
                balance=int(r.balance or 0),
                held=int(r.held or 0),
                total_purchased=int(purchased.get(r.id) or 0),
                open_flags=tuple(flags.get(r.id, [])),
                created_at=r.created_at,
                last_activity=max(seen) if seen else None,
            )
        )
    return result


def _as_utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _user_rows() -> sa.Select[Any]:
    return sa.select(
        users.c.id,
        users.c.email,
        users.c.name,
        users.c.is_suspended,
        users.c.created_at,
        users.c.last_seen_at,
        credit_accounts.c.balance,
        credit_accounts.c.held,
    ).select_from(users.outerjoin(credit_accounts, credit_accounts.c.user_id == users.c.id))


def search_users(
    db: Database, *, query: str = "", page: int = 1, per_page: int = PER_PAGE
) -> UserPage:
    """Users whose email or name contains `query` (or whose id it is), newest first."""
    query = query.strip()[:320]
    where = _user_filter(query)
    with db.read(snapshot=True) as conn:
        total = int(
            conn.execute(sa.select(sa.func.count()).select_from(users).where(where)).scalar_one()
        )
        pages = _pages(total, per_page)
        page = min(max(1, page), pages)
        rows = conn.execute(
            _user_rows()
            .where(where)
            .order_by(users.c.id.desc())
            .offset((page - 1) * per_page)
            .limit(per_page)
        ).all()
        found = _summaries(conn, rows)
    return UserPage(users=found, total=total, page=page, pages=pages, query=query)


@dataclass(frozen=True, slots=True)
class LedgerLineView:
    id: int
    created_at: datetime
    kind: str
    amount: int
    balance_after: int  # the running balance
    actor: str
    reason: str
    reference: str | None


@dataclass(frozen=True, slots=True)
class HoldRow:
    id: int
    request_id: str
    amount: int
    status: str
    charged: int | None
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class UsageRow:
    id: int
    created_at: datetime
    model: str
    price_version_id: int
    input_tokens: int
    output_tokens: int
    cost: int
    charged: int
    unbilled: int
    outcome: str
    estimated: bool


@dataclass(frozen=True, slots=True)
class FlagRow:
    id: int
    kind: str
    amount: int
    detail: str
    purchase_id: int | None
    created_at: datetime
    cleared_at: datetime | None
    cleared_by: str | None
    clear_note: str | None


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    created_at: datetime
    actor_email: str
    action: str
    target_user_id: int | None
    target_email: str | None
    detail: str
    reason: str


@dataclass(frozen=True, slots=True)
class UserDetail:
    user: UserSummary
    ledger: list[LedgerLineView]  # newest first
    holds: list[HoldRow]
    purchases: list[PurchaseView]
    usage: list[UsageRow]
    flags: list[FlagRow]
    expiring: list[tuple[datetime, int]]
    audit: list[AuditRow]


def user_detail(db: Database, *, user_id: int, limit: int = 100) -> UserDetail:
    """Everything about one account an admin needs, read from one snapshot."""
    with db.read(snapshot=True) as conn:
        row = conn.execute(_user_rows().where(users.c.id == user_id)).first()
        if row is None:
            raise UnknownUser(f"no user {user_id}")
        (summary,) = _summaries(conn, [row])
        entries = [
            LedgerLineView(
                id=r.id,
                created_at=r.created_at,
                kind=r.kind,
                amount=r.amount,
                balance_after=r.balance_after,
                actor=r.actor,
                reason=r.reason,
                reference=r.reference,
            )
            for r in conn.execute(
                sa.select(ledger_entries)
                .where(ledger_entries.c.user_id == user_id)
                .order_by(ledger_entries.c.id.desc())
                .limit(limit)
            )
        ]
        hold_rows = [
            HoldRow(
                id=r.id,
                request_id=r.request_id,
                amount=r.amount,
                status=r.status,
                charged=r.charged,
                created_at=r.created_at,
                expires_at=r.expires_at,
            )
            for r in conn.execute(
                sa.select(holds)
                .where(holds.c.user_id == user_id)
                # Pending first: those are what keeps credits from being available.
                .order_by((holds.c.status == "pending").desc(), holds.c.id.desc())
                .limit(limit)
            )
        ]
        usage = [
            UsageRow(
                id=r.id,
                created_at=r.created_at,
                model=r.model,
                price_version_id=r.price_version_id,
                input_tokens=r.input_tokens,
                output_tokens=r.output_tokens,
                cost=r.cost,
                charged=r.charged,
                unbilled=r.unbilled,
                outcome=r.outcome,
                estimated=bool(r.estimated),
            )
            for r in conn.execute(
                sa.select(usage_events)
                .where(usage_events.c.user_id == user_id)
                .order_by(usage_events.c.id.desc())
                .limit(limit)
            )
        ]
        flags = [
            FlagRow(
                id=r.id,
                kind=r.kind,
                amount=r.amount,
                detail=r.detail,
                purchase_id=r.purchase_id,
                created_at=r.created_at,
                cleared_at=r.cleared_at,
                cleared_by=r.cleared_by,
                clear_note=r.clear_note,
            )
            for r in conn.execute(
                sa.select(account_flags)
                .where(account_flags.c.user_id == user_id)
                .order_by(account_flags.c.cleared_at.is_not(None), account_flags.c.id.desc())
            )
        ]
        audit = _audit_rows(conn, admin_actions.c.target_user_id == user_id, 0, limit)
    return UserDetail(
        user=summary,
        ledger=entries,
        holds=hold_rows,
        purchases=list_purchases(db, user_id=user_id, limit=limit),
        usage=usage,
        flags=flags,
        expiring=ledger.expiring_credits(db, user_id=user_id),
        audit=audit,
    )


# --- the audit log, read ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditPage:
    rows: list[AuditRow]
    total: int
    page: int
    pages: int


def _audit_rows(conn: Connection, where: Any, offset: int, limit: int) -> list[AuditRow]:
    target = users.alias("target")
    return [
        AuditRow(
            id=r.id,
            created_at=r.created_at,
            actor_email=r.actor_email,
            action=r.action,
            target_user_id=r.target_user_id,
            target_email=r.target_email,
            detail=r.detail,
            reason=r.reason,
        )
        for r in conn.execute(
            sa.select(admin_actions, target.c.email.label("target_email"))
            .select_from(
                admin_actions.outerjoin(target, target.c.id == admin_actions.c.target_user_id)
            )
            .where(where)
            .order_by(admin_actions.c.id.desc())
            .offset(offset)
            .limit(limit)
        )
    ]


def list_audit(db: Database, *, page: int = 1, per_page: int = PER_PAGE) -> AuditPage:
    """The audit log, newest first."""
    with db.read(snapshot=True) as conn:
        total = int(
            conn.execute(sa.select(sa.func.count()).select_from(admin_actions)).scalar_one()
        )
        pages = _pages(total, per_page)
        page = min(max(1, page), pages)
        rows = _audit_rows(conn, sa.true(), (page - 1) * per_page, per_page)
    return AuditPage(rows=rows, total=total, page=page, pages=pages)


# --- the overview and spike alerts ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelUsage:
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    cost: int  # credits the calls cost upstream, billed or not
    charged: int
    unbilled: int


@dataclass(frozen=True, slots=True)
class Spender:
    user_id: int
    email: str | None
    name: str
    spent: int


@dataclass(frozen=True, slots=True)
class SpikeAlert:
    user_id: int
    email: str | None
    name: str
    last_hour: int
    # Credits spent in the 7 days before that hour; the usual hourly spend is this / 168.
    previous_week: int

    @property
    def usual_hourly(self) -> Fraction:
        return Fraction(self.previous_week, SPIKE_BASELINE_HOURS)


@dataclass(frozen=True, slots=True)
class LimitedAddress:
    """A client address (an IPv6 client: its /64) that reached the daily free trial limit:
    new accounts from it that UTC day with the trial, and without it."""

    address: str
    day: date
    granted: int
    refused: int


@dataclass(frozen=True, slots=True)
class Overview:
    since: datetime
    until: datetime
    user_count: int
    # Sums of ledger entries over the window, by kind (debits as positive numbers).
    credits_sold: int
    credits_granted: int
    credits_spent: int
    credits_clawed_back: int
    credits_expired: int
    adjustments_net: int
    usage_by_model: list[ModelUsage]
    top_spenders: list[Spender]
    spikes: list[SpikeAlert]
    # Addresses that had sign-ups refused the free trial, most recent day first.
    limited_addresses: list[LimitedAddress]


def overview(
    db: Database,
    *,
    spike_factor: float,
    spike_min_credits: int,
    days: int = 30,
    top: int = 10,
    now: datetime | None = None,
) -> Overview:
    """The money over the last `days`: credits sold, granted and spent, upstream cost by model,
    the top spenders, the users whose spending just spiked, and the addresses that reached
    the free trial limit."""
    now = now or utcnow()
    since = now - timedelta(days=days)
    window = sa.and_(ledger_entries.c.created_at >= since, ledger_entries.c.created_at <= now)
    with db.read(snapshot=True) as conn:
        user_count = int(conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one())
        by_kind = {
            kind: int(total or 0)
            for kind, total in conn.execute(
                sa.select(ledger_entries.c.kind, sa.func.sum(ledger_entries.c.amount))
                .where(window)
                .group_by(ledger_entries.c.kind)
            )
        }
        usage = [
            ModelUsage(
                model=r.model,
                calls=int(r.calls),
                input_tokens=int(r.input_tokens or 0),
                output_tokens=int(r.output_tokens or 0),
                cost=int(r.cost or 0),
                charged=int(r.charged or 0),
                unbilled=int(r.unbilled or 0),
            )
            for r in conn.execute(
                sa.select(
                    usage_events.c.model,
                    sa.func.count().label("calls"),
                    sa.func.sum(usage_events.c.input_tokens).label("input_tokens"),
                    sa.func.sum(usage_events.c.output_tokens).label("output_tokens"),
                    sa.func.sum(usage_events.c.cost).label("cost"),
                    sa.func.sum(usage_events.c.charged).label("charged"),
                    sa.func.sum(usage_events.c.unbilled).label("unbilled"),
                )
                .where(usage_events.c.created_at >= since, usage_events.c.created_at <= now)
                .group_by(usage_events.c.model)
                .order_by(sa.func.sum(usage_events.c.cost).desc(), usage_events.c.model)
            )
        ]
        spent = sa.func.sum(-ledger_entries.c.amount).label("spent")
        spenders = [
            Spender(user_id=r.id, email=r.email, name=r.name, spent=int(r.spent))
            for r in conn.execute(
                sa.select(users.c.id, users.c.email, users.c.name, spent)
                .select_from(ledger_entries.join(users, users.c.id == ledger_entries.c.user_id))
                .where(window, ledger_entries.c.kind == EntryKind.SPEND.value)
                .group_by(users.c.id, users.c.email, users.c.name)
                .order_by(spent.desc(), users.c.id)
                .limit(top)
            )
        ]
        limited = [
            LimitedAddress(
                address=r.address, day=r.day, granted=int(r.granted), refused=int(r.refused)
            )
            for r in conn.execute(
                sa.select(trial_addresses)
                .where(trial_addresses.c.day >= since.date(), trial_addresses.c.refused > 0)
                .order_by(
                    trial_addresses.c.day.desc(),
                    trial_addresses.c.refused.desc(),
                    trial_addresses.c.address,
                )
                .limit(MAX_LIMITED_ADDRESSES)
            )
        ]
    return Overview(
        since=since,
        until=now,
        user_count=user_count,
        credits_sold=by_kind.get(EntryKind.PURCHASE.value, 0),
        credits_granted=by_kind.get(EntryKind.GRANT.value, 0),
        credits_spent=-by_kind.get(EntryKind.SPEND.value, 0),
        credits_clawed_back=-by_kind.get(EntryKind.CLAWBACK.value, 0),
        credits_expired=-by_kind.get(EntryKind.EXPIRY.value, 0),
        adjustments_net=by_kind.get(EntryKind.ADJUSTMENT.value, 0),
        usage_by_model=usage,
        top_spenders=spenders,
        spikes=spike_alerts(db, factor=spike_factor, min_credits=spike_min_credits, now=now),
        limited_addresses=limited,
    )


def trial_limit_rule(settings: Settings) -> str:
    """The free trial's limit per address, in words, for the overview."""
    if settings.free_trial_credits <= 0:
        return "No free trial is given (FREE_TRIAL_CREDITS is 0), so nothing is limited."
    limit = settings.trials_per_address_per_day
    if limit <= 0:
        return "Free trials are not limited per address (TRIALS_PER_ADDRESS_PER_DAY is 0)."
    return (
        f"At most {limit:,} new accounts a day from one address (an IPv6 /64) get the free "
        "trial; later ones that day are created without it and told why."
    )


def spike_alerts(
    db: Database, *, factor: float, min_credits: int, now: datetime | None = None
) -> list[SpikeAlert]:
    """Users who spent, in the last hour, at least `min_credits` and more than `factor` times
    their average hourly spend over the 7 days before it. Biggest hour first."""
    now = now or utcnow()
    hour_start = now - timedelta(hours=1)
    week_start = hour_start - timedelta(hours=SPIKE_BASELINE_HOURS)
    recent = usage_events.c.created_at >= hour_start
    last_hour = sa.func.sum(sa.case((recent, usage_events.c.charged), else_=0))
    before = sa.func.sum(sa.case((recent, 0), else_=usage_events.c.charged))
    with db.read(snapshot=True) as conn:
        rows = conn.execute(
            sa.select(
                users.c.id,
                users.c.email,
                users.c.name,
                last_hour.label("last_hour"),
                before.label("before"),
            )
            .select_from(usage_events.join(users, users.c.id == usage_events.c.user_id))
            .where(usage_events.c.created_at >= week_start, usage_events.c.created_at <= now)
            .group_by(users.c.id, users.c.email, users.c.name)
            .having(last_hour >= max(min_credits, 1))
        ).all()
    # Exact: the factor is compared as a fraction, never as a float product of credits.
    ratio = Fraction(str(factor))
    alerts = [
        SpikeAlert(
            user_id=r.id,
            email=r.email,
            name=r.name,
            last_hour=int(r.last_hour),
            previous_week=int(r.before or 0),
        )
        for r in rows
        if int(r.last_hour) * SPIKE_BASELINE_HOURS > ratio * int(r.before or 0)
    ]
    return sorted(alerts, key=lambda a: (-a.last_hour, a.user_id))


def _minute(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else ""
