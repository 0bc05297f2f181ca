"""The purchase records: one row per Checkout Session, read into a typed PurchaseView, and
the queries the checkout, fulfilment, refunds and webhook share."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database, reading
from aicredits.adapters.tables import purchases
from aicredits.settings import CreditPack


@dataclass(frozen=True, slots=True)
class PurchaseView:
    """A purchase row, read once: what the services work from and the pages show."""

    id: int
    user_id: int
    checkout_session_id: str
    pack_id: str
    credits: int
    amount: int
    currency: str
    status: str
    amount_refunded: int
    credits_granted: int
    credits_clawed_back: int
    credits_shortfall: int
    receipt_url: str | None
    flagged: bool
    simulated: bool
    payment_intent_id: str | None
    charge_id: str | None
    customer_id: str | None
    created_at: datetime
    fulfilled_at: datetime | None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> PurchaseView:
        return cls(
            id=row.id,
            user_id=row.user_id,
            checkout_session_id=row.checkout_session_id,
            pack_id=row.pack_id,
            credits=row.credits,
            amount=row.amount,
            currency=row.currency,
            status=row.status,
            amount_refunded=row.amount_refunded,
            credits_granted=row.credits_granted,
            credits_clawed_back=row.credits_clawed_back,
            credits_shortfall=row.credits_shortfall,
            receipt_url=row.receipt_url,
            flagged=row.flagged,
            simulated=row.simulated,
            payment_intent_id=row.payment_intent_id,
            charge_id=row.charge_id,
            customer_id=row.customer_id,
            created_at=row.created_at,
            fulfilled_at=row.fulfilled_at,
        )

    @property
    def status_label(self) -> str:
        if self.status == "paid" and self.amount_refunded >= self.amount > 0:
            return "Refunded"
        if self.status == "paid" and self.amount_refunded > 0:
            return "Partly refunded"
        return {
            "open": "Awaiting payment",
            "pending": "Processing",
            "paid": "Paid",
            "failed": "Failed",
            "expired": "Not completed",
        }.get(self.status, self.status)


def list_purchases(
    target: Database | Connection, *, user_id: int, limit: int = 50
) -> list[PurchaseView]:
    """A user's purchase history, newest first. Checkouts abandoned before paying are left
    out: nothing happened in them."""
    with reading(target) as conn:
        rows = conn.execute(
            sa.select(purchases)
            .where(
                purchases.c.user_id == user_id,
                purchases.c.status.not_in(("open", "expired")),
            )
            .order_by(purchases.c.created_at.desc(), purchases.c.id.desc())
            .limit(limit)
        ).all()
    return [PurchaseView.from_row(r) for r in rows]


def get_purchase(db: Database, *, session_id: str) -> PurchaseView | None:
    with db.read() as conn:
        return purchase_of_session(conn, session_id)


def purchase_of_session(conn: Connection, session_id: str) -> PurchaseView | None:
    row = conn.execute(by_session(session_id)).first()
    return None if row is None else PurchaseView.from_row(row)


def by_session(session_id: str) -> sa.Select[Any]:
    return sa.select(purchases).where(purchases.c.checkout_session_id == session_id)


def purchase_of_payment(
    db: Database, payment_intent_id: str | None, charge_id: str | None
) -> PurchaseView | None:
    """The purchase a payment intent or charge paid for, if we know it yet."""
    conditions = []
    if payment_intent_id:
        conditions.append(purchases.c.payment_intent_id == payment_intent_id)
    if charge_id:
        conditions.append(purchases.c.charge_id == charge_id)
    if not conditions:
        return None
    with db.read() as conn:
        row = conn.execute(
            sa.select(purchases).where(sa.or_(*conditions)).order_by(purchases.c.id)
        ).first()
    return None if row is None else PurchaseView.from_row(row)


def lock_purchase(conn: Connection, purchase_id: int) -> PurchaseView:
    """Read a purchase and hold its row until the caller's transaction ends, so that its
    fulfilment and refund settlements run one at a time (FOR UPDATE on Postgres; SQLite
    runs one writer at a time already)."""
    row = conn.execute(
        sa.select(purchases).where(purchases.c.id == purchase_id).with_for_update()
    ).one()
    return PurchaseView.from_row(row)


def insert_purchase(
    db: Database,
    *,
    user_id: int,
    pack: CreditPack,
    session_id: str,
    amount: int,
    currency: str,
    customer_id: str | None,
    simulated: bool,
    now: datetime,
) -> None:
    """The purchase row of a Checkout Session just made (once per session id)."""
    with db.transaction() as conn:
        conn.execute(
            db.insert_ignoring_conflict(purchases, index="checkout_session_id").values(
                user_id=user_id,
                pack_id=pack.id,
                credits=pack.credits,
                amount=amount,
                currency=currency,
                checkout_session_id=session_id,
                customer_id=customer_id,
                status="open",
                simulated=simulated,
                flagged=False,
                created_at=now,
                updated_at=now,
            )
        )
