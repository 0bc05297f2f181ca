"""The two statements on the metered path, RESERVE and SETTLE, written per database.

Postgres: each is ONE statement run in autocommit (data-modifying CTEs). The account row is
locked only while the server executes and commits it, never across a network round trip,
which is what lets one hot account sustain thousands of calls a second. A unique violation
or any error aborts the whole statement, so a half-applied state cannot exist.

SQLite: the same effects as a short BEGIN IMMEDIATE transaction (SQLite has no DML in CTEs,
and it runs one writer at a time anyway).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import (
    TOP_UP_PREDICATE,
    credit_accounts,
    holds,
    ledger_entries,
    usage_events,
)


class _FifoLock:
    """A lock that lets waiters in strictly in arrival order (threading.Lock does not), so no
    caller on a busy account waits much longer than the others."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()
        self._held = False

    def __enter__(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        turn.acquire()  # released by the holder, who hands the lock over to us

    def __exit__(self, *_exc: object) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False


# One in-flight statement per account per process. Postgres serialises a hot account's row
# anyway; queueing here instead of in the server's lock manager keeps the server's wait
# queue short (one waiter per process), which roughly doubles a hot account's throughput.
# Correctness never depends on this: the statements are atomic on their own.
_GATES = [_FifoLock() for _ in range(256)]


def _gate(user_id: int) -> _FifoLock:
    return _GATES[user_id % len(_GATES)]


# The same gate for the statements sent from the event loop (reserve_hold_async,
# settle_hold_async): asyncio's Lock is FIFO, and a waiter holds no thread.
_ASYNC_GATES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _async_gate(user_id: int) -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    gates = _ASYNC_GATES.get(loop)
    if gates is None:
        gates = _ASYNC_GATES[loop] = [asyncio.Lock() for _ in range(len(_GATES))]
    return gates[user_id % len(gates)]


class RequestIdTaken(Exception):
    """The request id already has a hold."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    model: str
    price_version_id: int
    input_tokens: int
    output_tokens: int
    estimated: bool
    outcome: str


@dataclass(frozen=True, slots=True)
class HoldPricing:
    """What a hold's call is priced by, kept on the hold for the sweeper."""

    model: str
    price_version_id: int
    input_tokens: int
    # A keyed call's request digest (tables.Hold.request_digest); None without a key.
    request_digest: str | None = None


@dataclass(frozen=True, slots=True)
class Settled:
    balance_after: int
    usage_event_id: int | None
    # The entry that started the user's current allowance (its id and balance_after), read in
    # the same statement, so the caller can tell whether a usage threshold may have been
    # reached without another round trip (services.thresholds.may_need_recording).
    top_up_id: int | None = None
    top_up_balance_after: int = 0


# --- Postgres ---------------------------------------------------------------------------------

PG_RESERVE = """
WITH acct AS (
    UPDATE credit_accounts SET held = held + %(amount)s
    WHERE user_id = %(user_id)s AND balance - held >= %(amount)s
    RETURNING user_id
)
INSERT INTO holds (user_id, request_id, amount, status, unbilled, created_at, expires_at,
    model, price_version_id, input_tokens, delivered_tokens, request_digest)
SELECT user_id, %(request_id)s, %(amount)s, 'pending', 0, %(now)s, %(expires_at)s,
    %(model)s, %(price_version_id)s, %(input_tokens)s, 0, %(request_digest)s
FROM acct
RETURNING id
"""

# Settle: move the hold out of pending (the exactly-once guard), free it and charge the
# account, append the spend entry with the balance the account UPDATE returned.
# {lapsed} is empty for the worker's own settle; the sweeper adds that the lease has lapsed,
# so a hold whose worker renewed it meanwhile is left to that worker.
# The last top-up (the current allowance's start: services.thresholds.last_top_up_query)
# rides along in the final SELECT; it is not a change of the settle, only what it returns.
_PG_SETTLE_WITH_USAGE = """
WITH h AS (
    UPDATE holds
    SET status = 'settled', charged = %(charged)s, unbilled = %(unbilled)s,
        finalized_at = %(now)s
    WHERE id = %(hold_id)s AND status = 'pending' AND amount = %(amount)s{lapsed}
    RETURNING id, user_id
),
a AS (
    UPDATE credit_accounts AS c
    SET balance = c.balance - %(charged)s, held = c.held - %(amount)s
    FROM h WHERE c.user_id = h.user_id
    RETURNING c.balance
),
u AS (
    INSERT INTO usage_events
        (user_id, request_id, hold_id, model, price_version_id, input_tokens, output_tokens,
         estimated, outcome, cost, charged, unbilled, created_at)
    SELECT h.user_id, %(request_id)s, h.id, %(model)s, %(price_version_id)s, %(input_tokens)s,
        %(output_tokens)s, %(estimated)s, %(outcome)s, %(cost)s, %(charged)s, %(unbilled)s,
        %(now)s
    FROM h
    RETURNING id
),
e AS (
    INSERT INTO ledger_entries
        (user_id, kind, amount, balance_after, idempotency_key, reference, actor, reason,
         created_at)
    SELECT h.user_id, 'spend', %(spend_amount)s, a.balance, %(spend_key)s, 'usage:' || u.id,
        %(actor)s, %(reason)s, %(now)s
    FROM h, a, u WHERE %(charged)s > 0
    RETURNING id
)
SELECT a.balance, u.id AS usage_id, top_up.id, top_up.balance_after FROM a CROSS JOIN u
LEFT JOIN LATERAL (
    SELECT t.id, t.balance_after FROM ledger_entries AS t
    WHERE t.user_id = %(user_id)s AND __TOP_UP__
    ORDER BY t.id DESC LIMIT 1
) AS top_up ON true
"""

_PG_SETTLE_WITHOUT_USAGE = """
WITH h AS (
    UPDATE holds
    SET status = 'settled', charged = %(charged)s, unbilled = %(unbilled)s,
        finalized_at = %(now)s
    WHERE id = %(hold_id)s AND status = 'pending' AND amount = %(amount)s{lapsed}
    RETURNING id, user_id
),
a AS (
    UPDATE credit_accounts AS c
    SET balance = c.balance - %(charged)s, held = c.held - %(amount)s
    FROM h WHERE c.user_id = h.user_id
    RETURNING c.balance
),
e AS (
    INSERT INTO ledger_entries
        (user_id, kind, amount, balance_after, idempotency_key, reference, actor, reason,
         created_at)
    SELECT h.user_id, 'spend', %(spend_amount)s, a.balance, %(spend_key)s, 'hold:' || h.id,
        %(actor)s, %(reason)s, %(now)s
    FROM h, a WHERE %(charged)s > 0
    RETURNING id
)
SELECT a.balance, NULL AS usage_id, top_up.id, top_up.balance_after FROM a
LEFT JOIN LATERAL (
    SELECT t.id, t.balance_after FROM ledger_entries AS t
    WHERE t.user_id = %(user_id)s AND __TOP_UP__
    ORDER BY t.id DESC LIMIT 1
) AS top_up ON true
"""
_LAPSED = " AND expires_at <= %(now)s"
_PG_SETTLE_WITH_USAGE = _PG_SETTLE_WITH_USAGE.replace("__TOP_UP__", TOP_UP_PREDICATE)
_PG_SETTLE_WITHOUT_USAGE = _PG_SETTLE_WITHOUT_USAGE.replace("__TOP_UP__", TOP_UP_PREDICATE)
PG_SETTLE_WITH_USAGE = _PG_SETTLE_WITH_USAGE.format(lapsed="")
PG_SETTLE_WITHOUT_USAGE = _PG_SETTLE_WITHOUT_USAGE.format(lapsed="")
PG_SETTLE_LAPSED_WITH_USAGE = _PG_SETTLE_WITH_USAGE.format(lapsed=_LAPSED)
PG_SETTLE_LAPSED_WITHOUT_USAGE = _PG_SETTLE_WITHOUT_USAGE.format(lapsed=_LAPSED)


# --- the operations ---------------------------------------------------------------------------


def reserve_hold(
    db: Database,
    *,
    user_id: int,
    amount: int,
    request_id: str,
    now: datetime,
    expires_at: datetime,
    pricing: HoldPricing | None = None,
) -> int | None:
    """Hold `amount` credits if the account has them available. Returns the hold id, or None
    when the account lacks the credits or does not exist (nothing changed either way).
    Raises RequestIdTaken when the request id already has a hold."""
    params = _reserve_params(user_id, amount, request_id, now, expires_at, pricing)
    if db.is_sqlite:
        try:
            return _reserve_sqlite(db, params)
        except sa.exc.IntegrityError as exc:
            if "UNIQUE" in str(exc.orig) and "request_id" in str(exc.orig):
                raise RequestIdTaken(request_id) from exc
            raise
    try:
        with _gate(user_id):
            row = db.execute_one(PG_RESERVE, params)
    except psycopg.errors.UniqueViolation as exc:
        raise RequestIdTaken(request_id) from exc
    return None if row is None else int(row[0])


async def reserve_hold_async(
    db: Database,
    *,
    user_id: int,
    amount: int,
    request_id: str,
    now: datetime,
    expires_at: datetime,
    pricing: HoldPricing | None = None,
) -> int | None:
    """reserve_hold on Postgres without a thread (Database.execute_one_async): the same
    statement, the same answers."""
    params = _reserve_params(user_id, amount, request_id, now, expires_at, pricing)
    try:
        async with _async_gate(user_id):
            row = await db.execute_one_async(PG_RESERVE, params)
    except psycopg.errors.UniqueViolation as exc:
        raise RequestIdTaken(request_id) from exc
    return None if row is None else int(row[0])


def _reserve_params(
    user_id: int,
    amount: int,
    request_id: str,
    now: datetime,
    expires_at: datetime,
    pricing: HoldPricing | None,
) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "amount": amount,
        "request_id": request_id,
        "now": now,
        "expires_at": expires_at,
        "model": pricing.model if pricing else "",
        "price_version_id": pricing.price_version_id if pricing else None,
        "input_tokens": pricing.input_tokens if pricing else 0,
        "request_digest": pricing.request_digest if pricing else None,
    }


class _Refused(Exception):
    pass


def _reserve_sqlite(db: Database, p: dict[str, Any]) -> int | None:
    try:
        with db.transaction() as conn:
            reserved = conn.execute(
                sa.update(credit_accounts)
                .where(
                    credit_accounts.c.user_id == p["user_id"],
                    credit_accounts.c.balance - credit_accounts.c.held >= p["amount"],
                )
                .values(held=credit_accounts.c.held + p["amount"])
            )
            if reserved.rowcount != 1:
                raise _Refused
            return int(
                conn.execute(
                    sa.insert(holds)
                    .values(
                        user_id=p["user_id"],
                        request_id=p["request_id"],
                        amount=p["amount"],
                        status="pending",
                        unbilled=0,
                        created_at=p["now"],
                        expires_at=p["expires_at"],
                        model=p["model"],
                        price_version_id=p["price_version_id"],
                        input_tokens=p["input_tokens"],
                        delivered_tokens=0,
                        request_digest=p["request_digest"],
                    )
                    .returning(holds.c.id)
                ).scalar_one()
            )
    except _Refused:
        return None


def settle_hold(
    db: Database,
    *,
    hold_id: int,
    user_id: int,
    request_id: str,
    amount: int,
    charged: int,
    unbilled: int,
    cost: int,
    usage: UsageRow | None,
    reason: str,
    now: datetime,
    only_if_lapsed: bool = False,
) -> Settled | None:
    """Move a pending hold to settled: charge `charged`, free the whole hold, record the usage
    event and the spend entry. Returns None (and changes nothing) if the hold is not pending,
    or, with `only_if_lapsed`, if its lease has not lapsed by `now`."""
    params = _settle_params(
        hold_id, user_id, request_id, amount, charged, unbilled, cost, usage, reason, now
    )
    if db.is_sqlite:
        return _settle_sqlite(db, params, user_id, usage is not None, only_if_lapsed)
    if only_if_lapsed:
        sql = PG_SETTLE_LAPSED_WITH_USAGE if usage is not None else PG_SETTLE_LAPSED_WITHOUT_USAGE
    else:
        sql = PG_SETTLE_WITH_USAGE if usage is not None else PG_SETTLE_WITHOUT_USAGE
    with _gate(user_id):
        row = db.execute_one(sql, params)
    return _settled(row)


async def settle_hold_async(
    db: Database,
    *,
    hold_id: int,
    user_id: int,
    request_id: str,
    amount: int,
    charged: int,
    unbilled: int,
    cost: int,
    usage: UsageRow | None,
    reason: str,
    now: datetime,
) -> Settled | None:
    """settle_hold (a worker's own, not the sweeper's) on Postgres without a thread: the
    same statement, the same answers."""
    params = _settle_params(
        hold_id, user_id, request_id, amount, charged, unbilled, cost, usage, reason, now
    )
    sql = PG_SETTLE_WITH_USAGE if usage is not None else PG_SETTLE_WITHOUT_USAGE
    async with _async_gate(user_id):
        row = await db.execute_one_async(sql, params)
    return _settled(row)


def _settled(row: tuple[Any, ...] | None) -> Settled | None:
    if row is None:
        return None
    return Settled(
        balance_after=int(row[0]),
        usage_event_id=row[1],
        top_up_id=row[2],
        top_up_balance_after=int(row[3] or 0),
    )


def _settle_params(
    hold_id: int,
    user_id: int,
    request_id: str,
    amount: int,
    charged: int,
    unbilled: int,
    cost: int,
    usage: UsageRow | None,
    reason: str,
    now: datetime,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "hold_id": hold_id,
        "user_id": user_id,
        "request_id": request_id,
        "amount": amount,
        "charged": charged,
        "unbilled": unbilled,
        "cost": cost,
        "spend_amount": -charged,
        "spend_key": f"spend:{request_id}",
        "actor": f"user:{user_id}",
        "reason": reason,
        "now": now,
    }
    if usage is not None:
        params.update(
            model=usage.model,
            price_version_id=usage.price_version_id,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            estimated=usage.estimated,
            outcome=usage.outcome,
        )
    return params


def _settle_sqlite(
    db: Database, p: dict[str, Any], user_id: int, with_usage: bool, only_if_lapsed: bool
) -> Settled | None:
    with db.transaction() as conn:
        lapsed = [holds.c.expires_at <= p["now"]] if only_if_lapsed else []
        moved = conn.execute(
            sa.update(holds)
            .where(
                holds.c.id == p["hold_id"],
                holds.c.status == "pending",
                holds.c.amount == p["amount"],
                *lapsed,
            )
            .values(
                status="settled",
                charged=p["charged"],
                unbilled=p["unbilled"],
                finalized_at=p["now"],
            )
        )
        if moved.rowcount != 1:
            return None
        usage_id = None
        if with_usage:
            usage_id = conn.execute(
                sa.insert(usage_events)
                .values(
                    user_id=user_id,
                    request_id=p["request_id"],
                    hold_id=p["hold_id"],
                    model=p["model"],
                    price_version_id=p["price_version_id"],
                    input_tokens=p["input_tokens"],
                    output_tokens=p["output_tokens"],
                    estimated=p["estimated"],
                    outcome=p["outcome"],
                    cost=p["cost"],
                    charged=p["charged"],
                    unbilled=p["unbilled"],
                    created_at=p["now"],
                )
                .returning(usage_events.c.id)
            ).scalar_one()
        balance = conn.execute(
            sa.update(credit_accounts)
            .where(credit_accounts.c.user_id == user_id)
            .values(
                balance=credit_accounts.c.balance - p["charged"],
                held=credit_accounts.c.held - p["amount"],
            )
            .returning(credit_accounts.c.balance)
        ).scalar_one()
        if p["charged"] > 0:
            conn.execute(
                sa.insert(ledger_entries).values(
                    user_id=user_id,
                    kind="spend",
                    amount=p["spend_amount"],
                    balance_after=balance,
                    idempotency_key=p["spend_key"],
                    reference=f"usage:{usage_id}" if usage_id else f"hold:{p['hold_id']}",
                    actor=p["actor"],
                    reason=p["reason"],
                    created_at=p["now"],
                )
            )
        top_up = conn.execute(
            sa.select(ledger_entries.c.id, ledger_entries.c.balance_after)
            .where(ledger_entries.c.user_id == user_id, sa.text(TOP_UP_PREDICATE))
            .order_by(ledger_entries.c.id.desc())
            .limit(1)
        ).first()
        return Settled(
            balance_after=int(balance),
            usage_event_id=usage_id,
            top_up_id=top_up.id if top_up is not None else None,
            top_up_balance_after=int(top_up.balance_after) if top_up is not None else 0,
        )
