"""verify-ledger: check every invariant of every account against one consistent snapshot."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database
from aicredits.adapters.tables import credit_accounts, credit_lots, holds, ledger_entries
from aicredits.domain.ledger import (
    AccountSnapshot,
    EntryView,
    HoldStatus,
    LedgerLine,
    LotGrant,
    account_violations,
    chain_violations,
    lot_remaining,
)


def verify_ledger(db: Database) -> list[str]:
    """Every broken invariant, in a stable order (account by account). Empty means clean."""
    with db.read(snapshot=True) as conn:
        return list(_violations(conn))


def _violations(conn: Connection) -> Iterator[str]:
    pending = _sums(
        conn,
        sa.select(holds.c.user_id, sa.func.sum(holds.c.amount))
        .where(holds.c.status == HoldStatus.PENDING.value)
        .group_by(holds.c.user_id),
    )
    lots: dict[int, list[LotGrant]] = defaultdict(list)
    closed: set[int] = set()
    for row in conn.execute(sa.select(credit_lots)):
        lots[row.user_id].append(
            LotGrant(id=row.id, entry_id=row.entry_id, amount=row.amount, expires_at=row.expires_at)
        )
        if row.closed_at is not None:
            closed.add(row.id)
    entries: dict[int, list[EntryView]] = defaultdict(list)
    lines: dict[int, list[LedgerLine]] = defaultdict(list)
    for row in conn.execute(
        sa.select(
            ledger_entries.c.user_id,
            ledger_entries.c.id,
            ledger_entries.c.kind,
            ledger_entries.c.amount,
            ledger_entries.c.balance_after,
            ledger_entries.c.reference,
        ).order_by(ledger_entries.c.user_id, ledger_entries.c.id)
    ):
        entries[row.user_id].append(
            EntryView(id=row.id, kind=row.kind, amount=row.amount, balance_after=row.balance_after)
        )
        if row.user_id in lots:
            lines[row.user_id].append(
                LedgerLine(id=row.id, kind=row.kind, amount=row.amount, reference=row.reference)
            )

    accounts = conn.execute(
        sa.select(
            credit_accounts.c.user_id, credit_accounts.c.balance, credit_accounts.c.held
        ).order_by(credit_accounts.c.user_id)
    ).all()
    known = set()
    for acct in accounts:
        known.add(acct.user_id)
        chain = entries.get(acct.user_id, [])
        remaining = lot_remaining(lots.get(acct.user_id, []), lines.get(acct.user_id, []))
        for lot_id in sorted(closed & remaining.keys()):
            if remaining[lot_id]:
                yield f"lot {lot_id}: closed with {remaining[lot_id]} credits left"
        snapshot = AccountSnapshot(
            user_id=acct.user_id,
            balance=acct.balance,
            held=acct.held,
            ledger_sum=sum(e.amount for e in chain),
            last_balance_after=chain[-1].balance_after if chain else None,
            pending_holds_sum=pending.get(acct.user_id, 0),
            expiring_sum=sum(v for k, v in remaining.items() if k not in closed),
        )
        yield from account_violations(snapshot)
        yield from chain_violations(acct.user_id, chain)

    for user_id in sorted(set(entries) - known):
        yield f"user {user_id} has ledger entries but no credit account"
    yield from _hold_violations(conn)


def _sums(conn: Connection, query: sa.Select[Any]) -> dict[int, int]:
    return {int(row[0]): int(row[1] or 0) for row in conn.execute(query)}


def _hold_violations(conn: Connection) -> Iterator[str]:
    spend = ledger_entries.alias("spend")
    rows = conn.execute(
        sa.select(holds.c.id, holds.c.amount, holds.c.charged, spend.c.amount.label("spent"))
        .select_from(
            holds.outerjoin(
                spend, spend.c.idempotency_key == sa.literal("spend:") + holds.c.request_id
            )
        )
        .where(holds.c.status != HoldStatus.PENDING.value)
        .order_by(holds.c.id)
    )
    for row in rows:
        charged = row.charged or 0
        spent = -(row.spent or 0)
        if charged > row.amount:
            yield f"hold {row.id}: charged {charged} exceeds its amount {row.amount}"
        if spent != charged:
            yield f"hold {row.id}: charged {charged} but its spend entry took {spent}"
