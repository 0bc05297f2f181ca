"""Fulfilling a Checkout Session: its pack is credited exactly once, when it is paid.

The ledger entry's unique key `purchase:{session id}` decides "once"; the webhook, the
success page and reconciliation all come through `fulfil_checkout_session`, so whichever
comes first credits and the others find it done. Only a session the app created credits,
and only with its pack from the app's own records (services.payment_trust).

The credit, the purchase row that records it and the settlement of any refund that came
first are one unit of work: all of it commits, or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import CheckoutSession
from aicredits.adapters.tables import purchases, utcnow
from aicredits.domain.ledger import EntryKind
from aicredits.services import ledger, payment_trust, receipts, refunds
from aicredits.services.payment_errors import UnknownCheckoutSession
from aicredits.services.purchases import PurchaseView, lock_purchase, purchase_of_session
from aicredits.settings import Settings


class FulfilmentStatus(StrEnum):
    CREDITED = "credited"
    PROCESSING = "processing"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Fulfilment:
    status: FulfilmentStatus
    credits: int
    purchase_id: int
    # True only for the call that actually added the credits.
    newly_credited: bool = False


def purchase_key(session_id: str) -> str:
    return f"purchase:{session_id}"


def fulfil_checkout_session(
    db: Database,
    settings: Settings,
    session: CheckoutSession,
    *,
    paid: bool | None = None,
    from_stripe: bool = False,
    now: datetime | None = None,
) -> Fulfilment:
    """Credit a Checkout Session's pack once it is paid, exactly once per session id.

    Shared by the webhook, the success page and reconciliation; the webhook and the success
    page then apply the events parked for its payment (stripe_webhook.apply_parked). `paid`
    overrides the session's own payment_status (async_payment_succeeded says so by its type).
    `from_stripe`: `session` was just read from Stripe's API rather than from an event.

    Only a session the app created credits, and only its pack from the app's own records
    (services.payment_trust); anything else raises UnmatchedSession (a paid session) or
    UnknownCheckoutSession, crediting nothing."""
    now = now or utcnow()
    with db.read() as conn:
        found = purchase_of_session(conn, session.id)
    if found is None:
        found, session = payment_trust.adopt_session(
            db, settings, session, from_stripe=from_stripe, now=now
        )
        paid = None  # Stripe's own view of the session says whether it is paid
    is_paid = session.payment_status == "paid" if paid is None else paid
    if is_paid:
        payment_trust.check_known_session(found, session)
    with db.transaction() as conn:
        purchase = lock_purchase(conn, found.id)
        _note_payment(conn, purchase.id, session, now)
        if not is_paid:
            status = _mark_unpaid(conn, purchase.id, session, now)
            return Fulfilment(_unpaid_status(status), purchase.credits, purchase.id)
        newly = purchase.fulfilled_at is None and _grant_purchase(conn, purchase, now)
        if newly:
            receipts.queue(
                conn,
                settings,
                kind="purchase",
                source_id=purchase.checkout_session_id,
                user_id=purchase.user_id,
                now=now,
            )
        refunds.settle_refunds(conn, purchase.id, now)  # a refund that came before this
    return Fulfilment(FulfilmentStatus.CREDITED, purchase.credits, purchase.id, newly)


def credit_paid_purchase(conn: Connection, purchase_id: int, now: datetime) -> bool:
    """Credit a purchase paid without a Checkout Session (an auto top-up's off-session
    payment), in the caller's transaction: the same grant, ledger key and settlement of any
    earlier refund as a Checkout purchase. True if this call added the credits."""
    purchase = lock_purchase(conn, purchase_id)
    newly = purchase.fulfilled_at is None and _grant_purchase(conn, purchase, now)
    refunds.settle_refunds(conn, purchase.id, now)
    return newly


def record_payment_failed(db: Database, session: CheckoutSession, now: datetime) -> bool:
    """A delayed payment failed: the purchase is marked failed, unless it was credited
    already (True if it was marked)."""
    purchase = _purchase_for_session(db, session)
    with db.transaction() as conn:
        _note_payment(conn, purchase.id, session, now)
        changed = conn.execute(
            sa.update(purchases)
            .where(purchases.c.id == purchase.id, purchases.c.fulfilled_at.is_(None))
            .values(status="failed", updated_at=now)
        ).rowcount
    return bool(changed)


def record_expired(db: Database, session: CheckoutSession, now: datetime) -> None:
    """A session left unpaid has expired (or was cancelled)."""
    purchase = _purchase_for_session(db, session)
    with db.transaction() as conn:
        conn.execute(
            sa.update(purchases)
            .where(purchases.c.id == purchase.id, purchases.c.status == "open")
            .values(status="expired", updated_at=now)
        )


def _grant_purchase(conn: Connection, purchase: PurchaseView, now: datetime) -> bool:
    """Credit the pack and record it on the purchase, in the caller's transaction; True if
    this call did. The ledger key decides "exactly once": a grant made before the purchase
    row recorded it (as older versions could leave behind) replays, and is recorded now."""
    entry = ledger.grant(
        conn,
        user_id=purchase.user_id,
        credits=purchase.credits,
        key=purchase_key(purchase.checkout_session_id),
        kind=EntryKind.PURCHASE,
        reason=f"bought the {purchase.pack_id} pack"
        + (" (simulated checkout)" if purchase.simulated else ""),
        reference=f"stripe:{purchase.checkout_session_id}",
        actor="stripe",
        now=now,
    )
    conn.execute(
        sa.update(purchases)
        .where(purchases.c.id == purchase.id, purchases.c.fulfilled_at.is_(None))
        .values(
            status="paid",
            credits_granted=purchases.c.credits,
            fulfilled_at=now,
            updated_at=now,
        )
    )
    return not entry.replayed


def _unpaid_status(status: str) -> FulfilmentStatus:
    if status == "failed":
        return FulfilmentStatus.FAILED
    if status == "expired":
        return FulfilmentStatus.CANCELLED
    if status == "paid":  # credited earlier; this is an older view of the session
        return FulfilmentStatus.CREDITED
    return FulfilmentStatus.PROCESSING


def _purchase_for_session(db: Database, session: CheckoutSession) -> PurchaseView:
    """The purchase row of a session the app created; nothing is made for any other."""
    with db.read() as conn:
        row = purchase_of_session(conn, session.id)
    if row is None:
        raise UnknownCheckoutSession("This checkout session was not started here.")
    return row


def _note_payment(
    conn: Connection, purchase_id: int, session: CheckoutSession, now: datetime
) -> None:
    """Keep the payment's Stripe ids and receipt, where the session tells us them."""
    known = {
        "payment_intent_id": session.payment_intent_id,
        "charge_id": session.charge_id,
        "customer_id": session.customer_id,
        "receipt_url": session.receipt_url,
    }
    values = {k: sa.func.coalesce(purchases.c[k], v) for k, v in known.items() if v}
    if not values:
        return
    missing = [purchases.c[k].is_(None) for k in values]
    conn.execute(
        sa.update(purchases)
        .where(purchases.c.id == purchase_id, sa.or_(*missing))
        .values(**values, updated_at=now)
    )


def _mark_unpaid(
    conn: Connection, purchase_id: int, session: CheckoutSession, now: datetime
) -> str:
    """A completed but unpaid session is waiting for its payment (a bank debit, say).
    Returns the purchase's status; a paid or failed purchase is never moved back."""
    if session.status == "complete":
        conn.execute(
            sa.update(purchases)
            .where(purchases.c.id == purchase_id, purchases.c.status.in_(("open", "expired")))
            .values(status="pending", updated_at=now)
        )
    return str(
        conn.execute(
            sa.select(purchases.c.status).where(purchases.c.id == purchase_id)
        ).scalar_one()
    )
