"""The credit ledger: two-phase holds and an append-only ledger, one transaction per operation.

Every operation is idempotent by its key (request id, idempotency key, or the hold's state).
Correctness rests on conditional statements, not on reading and then writing:

* RESERVE is `UPDATE credit_accounts SET held = held + :h WHERE ... AND balance - held >= :h`.
  Postgres re-checks the WHERE clause after waiting on the row lock; SQLite runs one writer
  at a time (BEGIN IMMEDIATE). Either way two reservations can never both spend the same credit.
* SETTLE and RELEASE move a hold out of `pending` with `UPDATE ... WHERE status = 'pending'`;
  whichever comes second changes nothing.
* Entries carry a unique idempotency key, inserted with ON CONFLICT DO NOTHING; a replay rolls
  the whole transaction back and returns the first result.
* What is left of an expiring grant is derived from the ledger (domain.lot_remaining), so only
  the expiry job reads lots, under the account's row lock.

The two calls on every metered request (reserve, settle) live in adapters.ledger_sql: one
statement each on Postgres.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters import ledger_sql
from aicredits.adapters.blocking import run_blocking
from aicredits.adapters.db import Database, insert_ignoring_conflict, reading, unit_of_work
from aicredits.adapters.ledger_sql import HoldPricing
from aicredits.adapters.tables import (
    credit_accounts,
    credit_lots,
    holds,
    ledger_entries,
    usage_events,
    users,
    utcnow,
)
from aicredits.domain.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    UnknownHold,
    UnknownUser,
)
from aicredits.domain.ledger import (
    EntryKind,
    HoldStatus,
    LedgerLine,
    LotGrant,
    expiry_take,
    lot_reference,
    lot_remaining,
    require_key,
    require_non_negative,
    require_nonzero,
    require_positive,
    require_reason,
    split_settlement,
)

# A hold's lease: renewed every few seconds by the worker running its call (see
# services.gateway); when it lapses, the sweeper settles the hold for what was delivered.
DEFAULT_HOLD_LEASE = timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class Balance:
    user_id: int
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass(frozen=True, slots=True)
class HoldView:
    id: int
    user_id: int
    request_id: str
    amount: int
    status: str
    charged: int | None
    unbilled: int
    expires_at: datetime
    # True when this call found the hold already made by an earlier call with the same id.
    replayed: bool = False
    # What the call is priced by, and what it had delivered at its last checkpoint.
    model: str = ""
    price_version_id: int | None = None
    input_tokens: int = 0
    delivered_tokens: int = 0
    # A keyed call's request digest (tables.Hold.request_digest).
    request_digest: str | None = None


@dataclass(frozen=True, slots=True)
class EntryResult:
    entry_id: int
    user_id: int
    kind: str
    amount: int
    balance_after: int
    idempotency_key: str
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What the gateway knows about a finished call, stored with its settlement."""

    model: str
    price_version_id: int
    input_tokens: int
    output_tokens: int
    estimated: bool = False
    outcome: str = "completed"


@dataclass(frozen=True, slots=True)
class SettleResult:
    hold: HoldView
    charged: int
    unbilled: int
    # False when the hold was already settled, released or expired: nothing changed now.
    applied: bool
    balance_after: int | None = None
    usage_event_id: int | None = None
    # When applied: the entry that started the current allowance (id, balance_after), read
    # by the settle itself; see services.thresholds.may_need_recording.
    top_up_id: int | None = None
    top_up_balance_after: int = 0


@dataclass(frozen=True, slots=True)
class ExpiryReport:
    lots_touched: int
    credits_expired: int
    # Whose credits expired: their usage warnings are recorded next.
    users: frozenset[int] = frozenset()


class _KeyReplayed(Exception):
    """An idempotency key was already used; raised inside the write's transaction (or
    savepoint) to roll it back."""


# ---------------------------------------------------------------------------------------------
# Reads


def get_balance(target: Database | Connection, *, user_id: int) -> Balance:
    with reading(target) as conn:
        row = conn.execute(
            sa.select(credit_accounts.c.balance, credit_accounts.c.held).where(
                credit_accounts.c.user_id == user_id
            )
        ).first()
    if row is None:
        raise UnknownUser(f"no credit account for user {user_id}")
    return Balance(user_id=user_id, balance=row.balance, held=row.held)


def get_hold(db: Database, *, hold_id: int) -> HoldView:
    with db.read() as conn:
        return _load_hold(conn, holds.c.id == hold_id)


def _hold_view(row: Any, *, replayed: bool = False) -> HoldView:
    return HoldView(
        id=row.id,
        user_id=row.user_id,
        request_id=row.request_id,
        amount=row.amount,
        status=row.status,
        charged=row.charged,
        unbilled=row.unbilled,
        expires_at=row.expires_at,
        replayed=replayed,
        model=row.model,
        price_version_id=row.price_version_id,
        input_tokens=row.input_tokens,
        delivered_tokens=row.delivered_tokens,
        request_digest=row.request_digest,
    )


def _load_hold(conn: Connection, where: Any, *, replayed: bool = False) -> HoldView:
    row = conn.execute(sa.select(holds).where(where)).first()
    if row is None:
        raise UnknownHold("no such hold")
    return _hold_view(row, replayed=replayed)


def _entry_result(row: Any, *, replayed: bool) -> EntryResult:
    return EntryResult(
        entry_id=row.id,
        user_id=row.user_id,
        kind=row.kind,
        amount=row.amount,
        balance_after=row.balance_after,
        idempotency_key=row.idempotency_key,
        replayed=replayed,
    )


def _existing_entry(target: Database | Connection, key: str) -> Any:
    with reading(target) as conn:
        row = conn.execute(
            sa.select(ledger_entries).where(ledger_entries.c.idempotency_key == key)
        ).first()
    if row is None:  # pragma: no cover - a replay means the row exists
        raise RuntimeError(f"idempotency key {key!r} reported as used but not found")
    return row


def _account_or_unknown(conn: Connection, user_id: int) -> Any:
    row = conn.execute(
        sa.select(credit_accounts.c.balance, credit_accounts.c.held).where(
            credit_accounts.c.user_id == user_id
        )
    ).first()
    if row is None:
        raise UnknownUser(f"no credit account for user {user_id}")
    return row


# ---------------------------------------------------------------------------------------------
# The one place a balance changes


def _apply_change(
    conn: Connection,
    *,
    user_id: int,
    amount: int,
    kind: EntryKind,
    key: str,
    actor: str,
    reason: str,
    reference: str | None,
    now: datetime,
    lot_expires_at: datetime | None = None,
) -> tuple[int, int]:
    """Change a balance and append its ledger entry. Returns (entry id, balance after).

    A debit may only take credits nobody has reserved (available = balance - held).
    """
    acct = credit_accounts
    where = acct.c.user_id == user_id
    if amount < 0:
        where = sa.and_(where, acct.c.balance - acct.c.held >= -amount)
    row = conn.execute(
        sa.update(acct)
        .where(where)
        .values(balance=acct.c.balance + amount)
        .returning(acct.c.balance)
    ).first()
    if row is None:
        current = _account_or_unknown(conn, user_id)
        raise InsufficientCredits(available=current.balance - current.held, needed=-amount)
    balance_after = int(row.balance)

    inserted = conn.execute(
        insert_ignoring_conflict(conn.dialect.name, ledger_entries, index="idempotency_key")
        .values(
            user_id=user_id,
            kind=kind.value,
            amount=amount,
            balance_after=balance_after,
            idempotency_key=key,
            reference=reference,
            actor=actor,
            reason=reason,
            created_at=now,
        )
        .returning(ledger_entries.c.id)
    ).first()
    if inserted is None:
        raise _KeyReplayed(key)
    entry_id = int(inserted.id)

    if lot_expires_at is not None and amount > 0:
        conn.execute(
            sa.insert(credit_lots).values(
                user_id=user_id, entry_id=entry_id, amount=amount, expires_at=lot_expires_at
            )
        )
    return entry_id, balance_after


def _credit_or_debit(
    target: Database | Connection,
    *,
    user_id: int,
    amount: int,
    kind: EntryKind,
    key: str,
    actor: str,
    reason: str,
    reference: str | None,
    now: datetime,
    lot_expires_at: datetime | None = None,
) -> EntryResult:
    try:
        with unit_of_work(target) as conn:
            entry_id, balance_after = _apply_change(
                conn,
                user_id=user_id,
                amount=amount,
                kind=kind,
                key=key,
                actor=actor,
                reason=reason,
                reference=reference,
                now=now,
                lot_expires_at=lot_expires_at,
            )
    except _KeyReplayed:
        existing = _existing_entry(target, key)
        if (existing.user_id, existing.kind, existing.amount) != (user_id, kind.value, amount):
            raise IdempotencyConflict(
                f"key {key!r} was already used for {existing.kind} of {existing.amount} "
                f"credits to user {existing.user_id}"
            ) from None
        return _entry_result(existing, replayed=True)
    except sa.exc.IntegrityError as exc:
        _raise_if_unknown_user(target, user_id, exc)
        raise
    return EntryResult(
        entry_id=entry_id,
        user_id=user_id,
        kind=kind.value,
        amount=amount,
        balance_after=balance_after,
        idempotency_key=key,
    )


def _raise_if_unknown_user(target: Database | Connection, user_id: int, exc: Exception) -> None:
    with reading(target) as conn:
        exists = conn.execute(sa.select(users.c.id).where(users.c.id == user_id)).first()
    if exists is None:
        raise UnknownUser(f"no user {user_id}") from exc


# ---------------------------------------------------------------------------------------------
# Operations


def grant(
    target: Database | Connection,
    *,
    user_id: int,
    credits: int,
    key: str,
    reason: str,
    expires_at: datetime | None = None,
    actor: str = "system",
    kind: EntryKind = EntryKind.GRANT,
    reference: str | None = None,
    now: datetime | None = None,
) -> EntryResult:
    """Add credits. With `expires_at`, whatever is unspent then leaves with an expiry entry.

    Given the Database, a transaction of its own; given a connection, part of the caller's
    unit of work (as every write here)."""
    now = now or utcnow()
    require_positive(credits)
    reason = require_reason(reason)
    key = require_key(key)
    if kind not in (EntryKind.GRANT, EntryKind.PURCHASE, EntryKind.REFUND):
        raise InvalidAmount(f"grant cannot record a {kind.value} entry")
    if expires_at is not None and expires_at <= now:
        raise InvalidAmount("the expiry must be in the future")
    return _credit_or_debit(
        target,
        user_id=user_id,
        amount=credits,
        kind=kind,
        key=key,
        actor=actor,
        reason=reason,
        reference=reference,
        now=now,
        lot_expires_at=expires_at,
    )


def adjust(
    target: Database | Connection,
    *,
    user_id: int,
    credits: int,
    key: str,
    actor: str,
    reason: str,
    reference: str | None = None,
    now: datetime | None = None,
) -> EntryResult:
    """An operator's signed correction. A debit can take only unreserved credits, never below 0."""
    now = now or utcnow()
    require_nonzero(credits)
    reason = require_reason(reason)
    key = require_key(key)
    actor = require_key(actor, "actor")
    return _credit_or_debit(
        target,
        user_id=user_id,
        amount=credits,
        kind=EntryKind.ADJUSTMENT,
        key=key,
        actor=actor,
        reason=reason,
        reference=reference,
        now=now,
    )


@dataclass(frozen=True, slots=True)
class ClawbackResult:
    entry: EntryResult | None
    taken: int
    # What could not be taken back because the credits were already spent (or are held by a
    # call in flight): recorded for an admin, never taken as debt.
    shortfall: int


def clawback(
    target: Database | Connection,
    *,
    user_id: int,
    credits: int,
    key: str,
    reason: str,
    reference: str | None = None,
    actor: str = "system",
    now: datetime | None = None,
) -> ClawbackResult:
    """Take back up to `credits` (a refund or chargeback of what bought them), never going
    below zero. Idempotent by key when it takes something: a replay returns what the first
    call took. When nothing can be taken, nothing is written (an entry cannot be zero), so
    the caller must record that outcome itself if it must not be retried later."""
    now = now or utcnow()
    require_positive(credits)
    reason = require_reason(reason)
    key = require_key(key)
    for _ in range(3):
        with reading(target) as conn:
            replay = conn.execute(
                sa.select(ledger_entries).where(ledger_entries.c.idempotency_key == key)
            ).first()
            current = _account_or_unknown(conn, user_id)
        if replay is not None:
            taken = -int(replay.amount)
            return ClawbackResult(_entry_result(replay, replayed=True), taken, credits - taken)
        take = min(credits, current.balance - current.held)
        if take <= 0:
            return ClawbackResult(None, 0, credits)
        try:
            entry = _credit_or_debit(
                target,
                user_id=user_id,
                amount=-take,
                kind=EntryKind.CLAWBACK,
                key=key,
                actor=actor,
                reason=reason,
                reference=reference,
                now=now,
            )
        except InsufficientCredits:
            continue  # spent or reserved meanwhile: look again
        taken = -entry.amount
        return ClawbackResult(entry, taken, credits - taken)
    return ClawbackResult(None, 0, credits)


def reserve(
    db: Database,
    *,
    user_id: int,
    credits: int,
    request_id: str,
    lease: timedelta = DEFAULT_HOLD_LEASE,
    pricing: HoldPricing | None = None,
    now: datetime | None = None,
) -> HoldView:
    """Reserve credits for one call, or raise InsufficientCredits. Replays return the first hold.

    The hold lives for `lease` unless renewed (renew_leases, record_progress). `pricing` lets
    the sweeper charge a call whose worker died for what it had delivered; without it such a
    hold is only released."""
    ask = _reservation(user_id, credits, request_id, lease, pricing, now)
    try:
        hold_id = ledger_sql.reserve_hold(db, **ask.statement())
    except ledger_sql.RequestIdTaken:
        return _replayed_hold(db, ask)
    if hold_id is None:
        _refuse(db, ask)
    return ask.hold(hold_id)


async def reserve_async(
    db: Database,
    *,
    user_id: int,
    credits: int,
    request_id: str,
    lease: timedelta = DEFAULT_HOLD_LEASE,
    pricing: HoldPricing | None = None,
    now: datetime | None = None,
) -> HoldView:
    """reserve() from the event loop: on Postgres its one statement goes out without a thread
    (the metered path); a replay, a refusal and SQLite take the thread path as before."""
    if db.is_sqlite:
        return await run_blocking(
            reserve, db, user_id=user_id, credits=credits, request_id=request_id, lease=lease,
            pricing=pricing, now=now,
        )  # fmt: skip
    ask = _reservation(user_id, credits, request_id, lease, pricing, now)
    try:
        hold_id = await ledger_sql.reserve_hold_async(db, **ask.statement())
    except ledger_sql.RequestIdTaken:
        return await run_blocking(_replayed_hold, db, ask)
    if hold_id is None:
        await run_blocking(_refuse, db, ask)
    assert hold_id is not None  # _refuse raised
    return ask.hold(hold_id)


@dataclass(frozen=True, slots=True)
class _Reservation:
    user_id: int
    credits: int
    request_id: str
    now: datetime
    expires_at: datetime
    pricing: HoldPricing | None

    def statement(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "amount": self.credits,
            "request_id": self.request_id,
            "now": self.now,
            "expires_at": self.expires_at,
            "pricing": self.pricing,
        }

    def hold(self, hold_id: int) -> HoldView:
        pricing = self.pricing
        return HoldView(
            id=hold_id,
            user_id=self.user_id,
            request_id=self.request_id,
            amount=self.credits,
            status=HoldStatus.PENDING.value,
            charged=None,
            unbilled=0,
            expires_at=self.expires_at,
            model=pricing.model if pricing else "",
            price_version_id=pricing.price_version_id if pricing else None,
            input_tokens=pricing.input_tokens if pricing else 0,
            request_digest=pricing.request_digest if pricing else None,
        )


def _reservation(
    user_id: int,
    credits: int,
    request_id: str,
    lease: timedelta,
    pricing: HoldPricing | None,
    now: datetime | None,
) -> _Reservation:
    now = now or utcnow()
    require_non_negative(credits)
    request_id = require_key(request_id, "request id")
    return _Reservation(user_id, credits, request_id, now, now + lease, pricing)


def _replayed_hold(db: Database, ask: _Reservation) -> HoldView:
    """The hold an earlier call with this request id made (the same reservation), or
    IdempotencyConflict."""
    with db.read() as conn:
        existing = _load_hold(conn, holds.c.request_id == ask.request_id, replayed=True)
    if existing.user_id != ask.user_id or existing.amount != ask.credits:
        raise IdempotencyConflict(
            f"request id {ask.request_id!r} was already used for a different reservation"
        ) from None
    return existing


def _refuse(db: Database, ask: _Reservation) -> NoReturn:
    with db.read() as conn:
        current = _account_or_unknown(conn, ask.user_id)
    raise InsufficientCredits(available=current.balance - current.held, needed=ask.credits)


def settle(
    db: Database,
    *,
    hold: HoldView | int,
    actual_credits: int,
    usage: UsageRecord | None = None,
    now: datetime | None = None,
    only_if_lapsed: bool = False,
) -> SettleResult:
    """Charge min(actual, hold), return the rest of the hold, and record the usage event.

    Exactly once per hold. If the hold was already released or expired (a very late worker),
    nothing is charged and the usage is recorded as unbilled, so the call is still on record.
    Pass the HoldView from reserve() to save a read; an id works too. With `only_if_lapsed`
    (the sweeper), a hold whose lease was renewed meanwhile is left alone.
    """
    now = now or utcnow()
    require_non_negative(actual_credits, "actual credits")
    if isinstance(hold, int):
        hold = get_hold(db, hold_id=hold)
    split = split_settlement(hold_amount=hold.amount, actual=actual_credits)
    settled = None
    if hold.status == HoldStatus.PENDING:
        settled = ledger_sql.settle_hold(
            db,
            hold_id=hold.id,
            user_id=hold.user_id,
            request_id=hold.request_id,
            amount=hold.amount,
            charged=split.charged,
            unbilled=split.unbilled,
            cost=actual_credits,
            usage=_usage_row(usage),
            reason=f"{usage.model} call" if usage else "metered call",
            now=now,
            only_if_lapsed=only_if_lapsed,
        )
    if settled is None and only_if_lapsed:
        return SettleResult(
            hold=get_hold(db, hold_id=hold.id), charged=0, unbilled=0, applied=False
        )
    if settled is None:  # already settled, released or expired, perhaps by a concurrent call
        return _settle_finished_hold(db, hold.id, actual_credits, usage, now)
    return _applied(hold, split.charged, split.unbilled, settled)


async def settle_async(
    db: Database,
    *,
    hold: HoldView,
    actual_credits: int,
    usage: UsageRecord | None = None,
    now: datetime | None = None,
) -> SettleResult:
    """settle() of a worker's own pending hold from the event loop: on Postgres its one
    statement goes out without a thread (the metered path); a hold no longer pending and
    SQLite take the thread path as before."""
    if db.is_sqlite or hold.status != HoldStatus.PENDING:
        return await run_blocking(
            settle, db, hold=hold, actual_credits=actual_credits, usage=usage, now=now
        )
    now = now or utcnow()
    require_non_negative(actual_credits, "actual credits")
    split = split_settlement(hold_amount=hold.amount, actual=actual_credits)
    settled = await ledger_sql.settle_hold_async(
        db,
        hold_id=hold.id,
        user_id=hold.user_id,
        request_id=hold.request_id,
        amount=hold.amount,
        charged=split.charged,
        unbilled=split.unbilled,
        cost=actual_credits,
        usage=_usage_row(usage),
        reason=f"{usage.model} call" if usage else "metered call",
        now=now,
    )
    if settled is None:  # already settled, released or expired, perhaps by a concurrent call
        return await run_blocking(_settle_finished_hold, db, hold.id, actual_credits, usage, now)
    return _applied(hold, split.charged, split.unbilled, settled)


def _applied(
    hold: HoldView, charged: int, unbilled: int, settled: ledger_sql.Settled
) -> SettleResult:
    return SettleResult(
        hold=replace(
            hold,
            status=HoldStatus.SETTLED.value,
            charged=charged,
            unbilled=unbilled,
            replayed=False,
        ),
        charged=charged,
        unbilled=unbilled,
        applied=True,
        balance_after=settled.balance_after,
        usage_event_id=settled.usage_event_id,
        top_up_id=settled.top_up_id,
        top_up_balance_after=settled.top_up_balance_after,
    )


def _usage_row(usage: UsageRecord | None) -> ledger_sql.UsageRow | None:
    if usage is None:
        return None
    return ledger_sql.UsageRow(
        model=usage.model,
        price_version_id=usage.price_version_id,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        estimated=usage.estimated,
        outcome=usage.outcome,
    )


def _settle_finished_hold(
    db: Database,
    hold_id: int,
    actual_credits: int,
    usage: UsageRecord | None,
    now: datetime,
) -> SettleResult:
    with db.transaction() as conn:
        hold = _load_hold(conn, holds.c.id == hold_id)
        usage_id = None
        if hold.status in (HoldStatus.RELEASED, HoldStatus.EXPIRED) and usage is not None:
            usage_id = conn.execute(
                db.insert_ignoring_conflict(usage_events, index="request_id")
                .values(
                    user_id=hold.user_id,
                    request_id=hold.request_id,
                    hold_id=hold.id,
                    model=usage.model,
                    price_version_id=usage.price_version_id,
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    estimated=usage.estimated,
                    outcome=usage.outcome,
                    cost=actual_credits,
                    charged=0,
                    unbilled=actual_credits,
                    created_at=now,
                )
                .returning(usage_events.c.id)
            ).scalar()
    settled = hold.status == HoldStatus.SETTLED
    return SettleResult(
        hold=hold,
        charged=hold.charged or 0,
        unbilled=hold.unbilled if settled else actual_credits,
        applied=False,
        usage_event_id=usage_id,
    )


def _release_held(conn: Connection, *, user_id: int, amount: int) -> None:
    conn.execute(
        sa.update(credit_accounts)
        .where(credit_accounts.c.user_id == user_id)
        .values(held=credit_accounts.c.held - amount)
    )


def _finish_hold(
    db: Database, *, hold_id: int, status: HoldStatus, now: datetime, due_only: bool = False
) -> tuple[HoldView, bool]:
    with db.transaction() as conn:
        where = [holds.c.id == hold_id, holds.c.status == HoldStatus.PENDING.value]
        if due_only:
            where.append(holds.c.expires_at <= now)
        row = conn.execute(
            sa.update(holds)
            .where(*where)
            .values(status=status.value, finalized_at=now)
            .returning(holds)
        ).first()
        if row is None:
            return _load_hold(conn, holds.c.id == hold_id), False
        if row.amount:
            _release_held(conn, user_id=row.user_id, amount=row.amount)
        return _hold_view(row), True


def release(db: Database, *, hold_id: int, now: datetime | None = None) -> HoldView:
    """Return a pending hold's credits untouched (the call failed before any output).

    A hold that is already settled, released or expired is returned unchanged.
    """
    hold, _ = _finish_hold(db, hold_id=hold_id, status=HoldStatus.RELEASED, now=now or utcnow())
    return hold


def lapsed_holds(db: Database, *, now: datetime | None = None, batch: int = 500) -> list[HoldView]:
    """Pending holds whose lease has lapsed: their worker stopped renewing them (it died)."""
    now = now or utcnow()
    with db.read() as conn:
        rows = conn.execute(
            sa.select(holds)
            .where(holds.c.status == HoldStatus.PENDING.value, holds.c.expires_at <= now)
            .order_by(holds.c.expires_at)
            .limit(batch)
        ).all()
    return [_hold_view(row) for row in rows]


def expire_lapsed_hold(db: Database, *, hold_id: int, now: datetime | None = None) -> bool:
    """Return a lapsed hold's credits untouched (status expired), if its lease is still
    lapsed. Returns whether it did."""
    _, changed = _finish_hold(
        db, hold_id=hold_id, status=HoldStatus.EXPIRED, now=now or utcnow(), due_only=True
    )
    return changed


def renew_leases(conn: Connection, *, hold_ids: Sequence[int], until: datetime) -> None:
    """Extend the leases of these holds (those still pending) to `until`."""
    if hold_ids:
        conn.execute(
            sa.update(holds)
            .where(holds.c.id.in_(hold_ids), holds.c.status == HoldStatus.PENDING.value)
            .values(expires_at=until)
        )


def record_progress(
    conn: Connection, *, hold_id: int, delivered_tokens: int, until: datetime, now: datetime
) -> bool:
    """Checkpoint how many output tokens a call has delivered, and renew its lease. Never
    lowers the count. Returns False when the hold is no longer pending."""
    require_non_negative(delivered_tokens, "delivered tokens")
    moved = conn.execute(
        sa.update(holds)
        .where(holds.c.id == hold_id, holds.c.status == HoldStatus.PENDING.value)
        .values(
            delivered_tokens=sa.func.max(holds.c.delivered_tokens, delivered_tokens)
            if conn.dialect.name == "sqlite"
            else sa.func.greatest(holds.c.delivered_tokens, delivered_tokens),
            checkpoint_at=now,
            expires_at=until,
        )
    )
    return bool(moved.rowcount)


def expire_due_grants(
    db: Database, *, now: datetime | None = None, batch: int = 500
) -> ExpiryReport:
    """Remove the unspent rest of every grant whose expiry has passed. Safe to run repeatedly,
    and from several workers at once: each lot is worked on under its account's row lock."""
    now = now or utcnow()
    with db.read() as conn:
        due = conn.execute(
            sa.select(credit_lots.c.id, credit_lots.c.user_id)
            .where(credit_lots.c.closed_at.is_(None), credit_lots.c.expires_at <= now)
            .order_by(credit_lots.c.expires_at, credit_lots.c.id)
            .limit(batch)
        ).all()
    touched = 0
    total = 0
    losers: set[int] = set()
    for lot_id, user_id in due:
        taken = _expire_lot(db, lot_id=lot_id, user_id=user_id, now=now)
        if taken:
            touched += 1
            total += taken
            losers.add(user_id)
    return ExpiryReport(lots_touched=touched, credits_expired=total, users=frozenset(losers))


def _lots_and_lines(conn: Connection, user_id: int) -> tuple[list[LotGrant], list[LedgerLine]]:
    lots = [
        LotGrant(id=r.id, entry_id=r.entry_id, amount=r.amount, expires_at=r.expires_at)
        for r in conn.execute(
            sa.select(
                credit_lots.c.id,
                credit_lots.c.entry_id,
                credit_lots.c.amount,
                credit_lots.c.expires_at,
            ).where(credit_lots.c.user_id == user_id)
        )
    ]
    lines = [
        LedgerLine(id=r.id, kind=r.kind, amount=r.amount, reference=r.reference)
        for r in conn.execute(
            sa.select(
                ledger_entries.c.id,
                ledger_entries.c.kind,
                ledger_entries.c.amount,
                ledger_entries.c.reference,
            )
            .where(ledger_entries.c.user_id == user_id)
            .order_by(ledger_entries.c.id)
        )
    ]
    return lots, lines


def expiring_credits(target: Database | Connection, *, user_id: int) -> list[tuple[datetime, int]]:
    """What is left of each open expiring grant, soonest first: (expires_at, credits)."""
    with reading(target, snapshot=True) as conn:
        lots, lines = _lots_and_lines(conn, user_id)
        closed = set(
            conn.execute(
                sa.select(credit_lots.c.id).where(
                    credit_lots.c.user_id == user_id, credit_lots.c.closed_at.is_not(None)
                )
            ).scalars()
        )
    remaining = lot_remaining(lots, lines)
    return [
        (lot.expires_at, remaining[lot.id])
        for lot in sorted(lots, key=lambda x: (x.expires_at, x.id))
        if lot.id not in closed and remaining.get(lot.id, 0) > 0
    ]


def _expire_lot(db: Database, *, lot_id: int, user_id: int, now: datetime) -> int:
    try:
        with db.transaction() as conn:
            # The account row lock serialises this with every balance change of this user.
            account = conn.execute(
                sa.select(credit_accounts.c.balance, credit_accounts.c.held)
                .where(credit_accounts.c.user_id == user_id)
                .with_for_update()
            ).one()
            closed_at = conn.execute(
                sa.select(credit_lots.c.closed_at).where(credit_lots.c.id == lot_id)
            ).scalar_one()
            if closed_at is not None:
                return 0
            lots, lines = _lots_and_lines(conn, user_id)
            remaining = lot_remaining(lots, lines).get(lot_id, 0)
            take = expiry_take(lot_remaining=remaining, available=account.balance - account.held)
            if take:
                _apply_change(
                    conn,
                    user_id=user_id,
                    amount=-take,
                    kind=EntryKind.EXPIRY,
                    key=f"expiry:{lot_id}:{remaining}",
                    actor="system",
                    reason="expiring credits passed their date",
                    reference=lot_reference(lot_id),
                    now=now,
                )
            if take == remaining:  # nothing of it is left, or can come back
                conn.execute(
                    sa.update(credit_lots).where(credit_lots.c.id == lot_id).values(closed_at=now)
                )
            return take
    except _KeyReplayed:
        return 0
