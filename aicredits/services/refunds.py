"""Refunds and disputes of a credited pack.

A refund takes back what the refunded part bought, pro rata, from Stripe's cumulative
`amount_refunded`, so partial refunds add up and arrive in any order. What cannot be taken
back (already spent) is recorded as a shortfall and the account is flagged. Each refund is
one unit of work holding the purchase's row: the ledger's clawback takes "what is available
now", which two concurrent settlements could each see whole.

A dispute flags the account and the purchase; it takes nothing by itself.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database, insert_ignoring_conflict
from aicredits.adapters.stripe_api import Charge, Dispute
from aicredits.adapters.tables import account_flags, purchases
from aicredits.domain.money import clawback_target, format_money, refund_due
from aicredits.services import ledger
from aicredits.services.purchases import PurchaseView, lock_purchase


def record_refund(db: Database, purchase: PurchaseView, charge: Charge, now: datetime) -> None:
    """Record a charge's refunds so far and settle them, in one transaction: the refund, what
    it takes back and any shortfall it leaves commit together."""
    with db.transaction() as conn:
        lock_purchase(conn, purchase.id)
        # Stripe's amount_refunded is cumulative: keep the largest seen, so partial refunds
        # arriving out of order end in the same place.
        conn.execute(
            sa.update(purchases)
            .where(
                purchases.c.id == purchase.id, purchases.c.amount_refunded < charge.amount_refunded
            )
            .values(amount_refunded=charge.amount_refunded, updated_at=now)
        )
        conn.execute(
            sa.update(purchases)
            .where(purchases.c.id == purchase.id)
            .values(
                charge_id=sa.func.coalesce(purchases.c.charge_id, charge.id),
                receipt_url=sa.func.coalesce(purchases.c.receipt_url, charge.receipt_url),
            )
        )
        settle_refunds(conn, purchase.id, now)


def settle_refunds(conn: Connection, purchase_id: int, now: datetime) -> None:
    """Take back the credits the refunds so far bought, as far as the balance allows; record
    the rest as a shortfall and flag the account. Nothing to do until the pack is credited.
    In the caller's transaction, holding the purchase's row until it ends."""
    while (due := _refund_due(row := lock_purchase(conn, purchase_id))) > 0:
        _settle_refund_step(conn, row, due, now)


def _refund_due(row: PurchaseView) -> int:
    return refund_due(
        credits_granted=row.credits_granted,
        amount=row.amount,
        amount_refunded=row.amount_refunded,
        clawed_back=row.credits_clawed_back,
        shortfall=row.credits_shortfall,
    )


def _settle_refund_step(conn: Connection, row: PurchaseView, due: int, now: datetime) -> None:
    settled = row.credits_clawed_back + row.credits_shortfall
    # Keyed by where this step starts: a clawback entry committed without its counters (as
    # older versions could leave behind) replays instead of taking twice.
    key = f"clawback:{row.checkout_session_id}:{settled}"
    result = ledger.clawback(
        conn,
        user_id=row.user_id,
        credits=due,
        key=key,
        reason=(
            f"refund of {format_money(row.amount_refunded, row.currency)} of "
            f"{format_money(row.amount, row.currency)} for the {row.pack_id} pack"
        ),
        reference=f"stripe:{row.checkout_session_id}",
        actor="stripe",
        now=now,
    )
    replayed = result.entry is not None and result.entry.replayed
    # A replayed step took what it took; whatever it could not is tried again next round.
    shortfall = 0 if replayed else due - result.taken
    conn.execute(
        sa.update(purchases)
        .where(purchases.c.id == row.id)
        .values(
            credits_clawed_back=purchases.c.credits_clawed_back + result.taken,
            credits_shortfall=purchases.c.credits_shortfall + shortfall,
            updated_at=now,
            **({"flagged": True} if shortfall else {}),
        )
    )
    if shortfall:
        conn.execute(
            insert_ignoring_conflict(
                conn.dialect.name, account_flags, index="idempotency_key"
            ).values(
                user_id=row.user_id,
                kind="refund_shortfall",
                purchase_id=row.id,
                detail=(
                    f"A refund of {format_money(row.amount_refunded, row.currency)} on the "
                    f"{row.pack_id} pack ({row.checkout_session_id}) called for {due:,} "
                    f"credits back; {result.taken:,} were taken and {shortfall:,} were "
                    "already spent or in use."
                )[:500],
                amount=shortfall,
                idempotency_key=f"shortfall:{row.checkout_session_id}:{settled}"[:200],
                created_at=now,
            )
        )


def flag_dispute(db: Database, purchase: PurchaseView, dispute: Dispute, now: datetime) -> None:
    """Flag the account and the purchase for an admin, once per dispute."""
    at_stake = clawback_target(
        credits=purchase.credits, amount=purchase.amount, amount_refunded=dispute.amount
    )
    with db.transaction() as conn:
        conn.execute(
            db.insert_ignoring_conflict(account_flags, index="idempotency_key").values(
                user_id=purchase.user_id,
                kind="dispute",
                purchase_id=purchase.id,
                detail=(
                    f"Dispute {dispute.id} ({dispute.reason}) of "
                    f"{format_money(dispute.amount, dispute.currency or purchase.currency)} on "
                    f"the {purchase.pack_id} pack bought with {purchase.checkout_session_id}"
                )[:500],
                amount=at_stake,
                idempotency_key=f"dispute:{dispute.id}"[:200],
                created_at=now,
            )
        )
        conn.execute(
            sa.update(purchases)
            .where(purchases.c.id == purchase.id)
            .values(flagged=True, updated_at=now)
        )
