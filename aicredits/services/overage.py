"""Metered overage (docs/plans.md): what each period used of its plan's credit line, reported
to Stripe once, when the period is over, as an invoice item of the plan's overage Price.

The credit line is a ledger grant (services.billing_events), so use never passes the ceiling
and no balance goes below zero. What was used of it is its amount less what expired of it;
it is read once the expiry job has closed its lot. The report carries the idempotency key
`aicredits-overage-{invoice id}` and is recorded on the invoice row, so it is made once per
period however often the job runs.
"""

from __future__ import annotations

import logging
from datetime import datetime

import sqlalchemy as sa

from aicredits.adapters import stripe_billing
from aicredits.adapters.db import Database
from aicredits.adapters.tables import credit_lots, invoices, ledger_entries, utcnow
from aicredits.domain.ledger import EntryKind, lot_reference
from aicredits.services.plans import label_of
from aicredits.services.stripe_config import stripe_client
from aicredits.settings import Settings

logger = logging.getLogger(__name__)


def used_of_credit_line(db: Database, *, entry_id: int) -> int | None:
    """What was used of a credit line whose lot is closed (None while it is still open)."""
    with db.read() as conn:
        lot = conn.execute(
            sa.select(credit_lots.c.id, credit_lots.c.amount, credit_lots.c.closed_at).where(
                credit_lots.c.entry_id == entry_id
            )
        ).first()
        if lot is None or lot.closed_at is None:
            return None
        expired = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(-ledger_entries.c.amount), 0)).where(
                ledger_entries.c.kind == EntryKind.EXPIRY.value,
                ledger_entries.c.reference == lot_reference(lot.id),
            )
        ).scalar_one()
    return max(int(lot.amount) - int(expired), 0)


def report_due(db: Database, settings: Settings, *, now: datetime | None = None) -> int:
    """Report every finished period's overage not yet reported. Returns how many were."""
    now = now or utcnow()
    with db.read() as conn:
        due = conn.execute(
            sa.select(invoices)
            .where(
                invoices.c.credit_line_entry_id.is_not(None),
                invoices.c.overage_reported_at.is_(None),
                invoices.c.period_end <= now,
            )
            .order_by(invoices.c.id)
            .limit(100)
        ).all()
    reported = 0
    for row in due:
        used = used_of_credit_line(db, entry_id=int(row.credit_line_entry_id))
        if used is None:
            continue  # the expiry job has not closed it yet
        item_id = None
        plan = settings.plan(row.plan_id or "")
        if used > 0 and not row.simulated and not settings.simulated_checkout:
            if plan is None or not plan.overage_price_id:
                logger.warning(
                    "overage of %s credits on invoice %s has no overage_price_id to bill by",
                    used,
                    row.invoice_id,
                )
                continue
            item_id = stripe_billing.create_overage_item(
                stripe_client(settings),
                customer_id=row.customer_id,
                subscription_id=row.subscription_id,
                price_id=plan.overage_price_id,
                quantity=used,
                description=f"{label_of(plan)} plan: {used:,} credits of overage",
                idempotency_key=f"aicredits-overage-{row.invoice_id}",
            )
        with db.transaction() as conn:
            conn.execute(
                sa.update(invoices)
                .where(invoices.c.id == row.id, invoices.c.overage_reported_at.is_(None))
                .values(overage_credits=used, overage_reported_at=now, overage_item_id=item_id)
            )
        reported += 1
    return reported
