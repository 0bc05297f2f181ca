"""Stripe's subscription and invoice events (docs/plans.md), applied once each by the
webhook (services.stripe_webhook stores each event id once; every credit here is keyed).

* `customer.subscription.created|updated|deleted` set the stored status, plan and period:
  the app never sets them itself. An older event than the one applied changes nothing, and a
  cancelled subscription stays cancelled.
* `invoice.paid` grants the period's included credits as an expiring grant ending with the
  period, keyed by the invoice id (`plan-invoice:{id}`), so each invoice grants once; a
  renewal ends the previous period's grant, whose rest leaves with an `expiry` entry. An
  upgrade's proration invoice grants the prorated difference of the two allowances.
* Trust, as for packs: a subscription or invoice counts only when its customer is the one the
  app made for a user and its metadata carries the app's keyed marker for that user
  (domain.checkout_marker); the plan, and so the credits, come from PLANS by the Stripe Price
  id, never from metadata. Anything else records nothing that grants credits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters import stripe_billing
from aicredits.adapters.db import Database
from aicredits.adapters.stripe_billing import InvoiceObject
from aicredits.adapters.tables import credit_lots, invoices, stripe_customers, subscriptions
from aicredits.domain import checkout_marker
from aicredits.domain.plans import InvoiceGrant, PlanLine, invoice_grant
from aicredits.services import ledger, payment_trust, receipts
from aicredits.services.plans import MARKER_TAG, label_of, plan_for_price
from aicredits.settings import Settings

logger = logging.getLogger(__name__)

# A metered plan's credit line ends this long after its period, so that it is spent after
# every grant of the period (soonest-expiring first).
CREDIT_LINE_LAG = timedelta(seconds=1)


def invoice_key(invoice_id: str) -> str:
    return f"plan-invoice:{invoice_id}"


def _ts(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value else None


# --- trust ------------------------------------------------------------------------------------


def _our_user(
    conn: Connection, settings: Settings, customer_id: str, metadata: Mapping[str, str]
) -> int | None:
    """The user a subscription belongs to, when it is one the app made: its customer is the
    one made for that user, and its metadata carries the app's keyed marker for them."""
    user_id = conn.execute(
        sa.select(stripe_customers.c.user_id).where(stripe_customers.c.customer_id == customer_id)
    ).scalar()
    if user_id is None:
        return None
    claims = checkout_marker.read_marker(
        payment_trust.marker_key(settings), metadata.get(checkout_marker.METADATA_KEY)
    )
    if claims is None or claims.user_id != user_id or claims.pack_id != MARKER_TAG:
        return None
    return int(user_id)


# --- Stripe's events --------------------------------------------------------------------------

EVENT_TYPES = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "invoice.paid",
        "invoice.payment_failed",
    }
)


def check_shape(event_type: str, obj: Mapping[str, Any]) -> None:
    """Raise MalformedEvent for a billing event whose object cannot be read."""
    if event_type.startswith("customer.subscription."):
        stripe_billing.parse_subscription(obj)
    else:
        stripe_billing.parse_invoice(obj)


def apply_event(
    db: Database,
    settings: Settings,
    event_type: str,
    obj: Mapping[str, Any],
    *,
    event_created: int,
    now: datetime,
) -> Applied:
    """Apply one of EVENT_TYPES (the webhook has verified it and stored its id once)."""
    if event_type == "invoice.paid":
        return apply_invoice_paid(db, settings, obj, now=now)
    if event_type == "invoice.payment_failed":
        return apply_invoice_failed(db, settings, obj, now=now)
    return apply_subscription(
        db,
        settings,
        obj,
        deleted=event_type == "customer.subscription.deleted",
        event_created=event_created,
        now=now,
    )


@dataclass(frozen=True, slots=True)
class Applied:
    outcome: str
    # Whose credits changed (their usage warnings may now be due).
    user_id: int | None = None


def apply_subscription(
    db: Database,
    settings: Settings,
    obj: Mapping[str, Any],
    *,
    deleted: bool,
    event_created: int,
    now: datetime,
) -> Applied:
    """`customer.subscription.created|updated|deleted`: store Stripe's view of it. An older
    event than the one last applied changes nothing, and a cancelled subscription stays so."""
    sub = stripe_billing.parse_subscription(obj)
    with db.read() as conn:
        user_id = _our_user(conn, settings, sub.customer_id, sub.metadata)
    if user_id is None:
        logger.info("subscription %s is not one this app made: nothing recorded", sub.id)
        return Applied("unknown_subscription")
    plan = plan_for_price(settings, sub.price_id)
    if plan is None:
        logger.warning("subscription %s has a price not in PLANS: %s", sub.id, sub.price_id)
        return Applied("unknown_plan")
    status = "canceled" if deleted else sub.status
    values = {
        "plan_id": plan.id,
        "price_id": sub.price_id or "",
        "status": status,
        "current_period_start": _ts(sub.current_period_start),
        "current_period_end": _ts(sub.current_period_end),
        "cancel_at_period_end": sub.cancel_at_period_end and not deleted,
        "event_created": event_created,
        "updated_at": now,
    }
    with db.transaction() as conn:
        inserted = conn.execute(
            db.insert_ignoring_conflict(subscriptions, index="subscription_id")
            .values(
                user_id=user_id,
                customer_id=sub.customer_id,
                subscription_id=sub.id,
                simulated=sub.id.startswith("sub_sim_"),
                created_at=now,
                **values,
            )
            .returning(subscriptions.c.id)
        ).first()
        if inserted is None:
            changed = conn.execute(
                sa.update(subscriptions)
                .where(
                    subscriptions.c.subscription_id == sub.id,
                    subscriptions.c.user_id == user_id,
                    subscriptions.c.event_created <= event_created,
                    subscriptions.c.status != "canceled",
                )
                .values(**values)
            ).rowcount
            if not changed:
                return Applied("stale_subscription_event")
    return Applied(f"subscription_{status}"[:32])


def _plan_lines(settings: Settings, invoice: InvoiceObject) -> tuple[list[PlanLine], str | None]:
    lines: list[PlanLine] = []
    plan_id: str | None = None
    for line in invoice.lines:
        plan = plan_for_price(settings, line.price_id)
        if plan is None or not line.period_start or not line.period_end:
            continue
        lines.append(
            PlanLine(
                included_credits=plan.included_credits,
                amount=line.amount,
                period_start=line.period_start,
                period_end=line.period_end,
                proration=line.proration,
            )
        )
        if not line.proration or line.amount > 0:
            plan_id = plan.id
    return lines, plan_id


def _period_seconds(conn: Connection, subscription_id: str | None) -> int | None:
    if not subscription_id:
        return None
    row = conn.execute(
        sa.select(subscriptions.c.current_period_start, subscriptions.c.current_period_end).where(
            subscriptions.c.subscription_id == subscription_id
        )
    ).first()
    if row is None or row.current_period_start is None or row.current_period_end is None:
        return None
    return int((row.current_period_end - row.current_period_start).total_seconds()) or None


def _record_invoice(
    conn: Connection,
    db: Database,
    invoice: InvoiceObject,
    *,
    user_id: int,
    plan_id: str | None,
    status: str,
    grant: InvoiceGrant | None,
    now: datetime,
) -> None:
    """The invoice row, made once; a paid invoice is never marked failed again."""
    conn.execute(
        db.insert_ignoring_conflict(invoices, index="invoice_id").values(
            invoice_id=invoice.id,
            user_id=user_id,
            customer_id=invoice.customer_id,
            subscription_id=invoice.subscription_id,
            plan_id=plan_id,
            billing_reason=invoice.billing_reason,
            status=status,
            amount=invoice.amount_paid if status == "paid" else invoice.amount_due,
            currency=invoice.currency,
            period_start=grant.period_start if grant else None,
            period_end=grant.expires_at if grant else None,
            hosted_invoice_url=invoice.hosted_invoice_url,
            invoice_pdf=invoice.invoice_pdf,
            simulated=invoice.id.startswith("in_sim_"),
            created_at=now,
            updated_at=now,
        )
    )
    if status == "paid":
        conn.execute(
            sa.update(invoices)
            .where(invoices.c.invoice_id == invoice.id, invoices.c.status != "paid")
            .values(
                status="paid",
                amount=invoice.amount_paid,
                plan_id=plan_id,
                period_start=grant.period_start if grant else None,
                period_end=grant.expires_at if grant else None,
                hosted_invoice_url=invoice.hosted_invoice_url,
                invoice_pdf=invoice.invoice_pdf,
                updated_at=now,
            )
        )


def apply_invoice_paid(
    db: Database, settings: Settings, obj: Mapping[str, Any], *, now: datetime
) -> Applied:
    """`invoice.paid`: grant the period's included credits (or an upgrade's difference) as
    an expiring grant keyed by the invoice, and end the previous period's grant."""
    invoice = stripe_billing.parse_invoice(obj)
    with db.read() as conn:
        user_id = _our_user(conn, settings, invoice.customer_id, invoice.subscription_metadata)
        period_seconds = _period_seconds(conn, invoice.subscription_id)
    if user_id is None:
        logger.info("invoice %s is not for a subscription this app made", invoice.id)
        return Applied("unknown_subscription")
    lines, plan_id = _plan_lines(settings, invoice)
    grant = invoice_grant(lines, period_seconds=period_seconds, now=now)
    with db.transaction() as conn:
        _record_invoice(
            conn, db, invoice, user_id=user_id, plan_id=plan_id, status="paid", grant=grant, now=now
        )
        receipts.queue(
            conn, settings, kind="invoice", source_id=invoice.id, user_id=user_id, now=now
        )
        if grant.credits <= 0 or grant.expires_at is None:
            return Applied("no_credits" if lines else "unknown_plan", user_id)
        renewal = grant.period_start is not None and invoice.subscription_id is not None
        if renewal:
            _end_earlier_periods(conn, invoice, grant)
    if renewal:
        # The previous period's rest leaves first, with its `expiry` entry, so the new
        # period's grant starts the allowance the usage warnings count against (an expiry
        # after it would read as credits used).
        ledger.expire_due_grants(db, now=now)
    with db.transaction() as conn:
        entry = ledger.grant(
            conn,
            user_id=user_id,
            credits=grant.credits,
            key=invoice_key(invoice.id),
            reason=_grant_reason(settings, plan_id, invoice),
            expires_at=grant.expires_at,
            actor="stripe",
            reference=f"stripe:{invoice.id}",
            now=now,
        )
        conn.execute(
            sa.update(invoices)
            .where(invoices.c.invoice_id == invoice.id, invoices.c.entry_id.is_(None))
            .values(credits_granted=grant.credits, entry_id=entry.entry_id)
        )
        if grant.period_start is not None:
            _grant_credit_line(conn, settings, invoice, plan_id, grant, user_id=user_id, now=now)
    return Applied("already_granted" if entry.replayed else "granted", user_id)


def credit_line_key(invoice_id: str) -> str:
    return f"plan-credit-line:{invoice_id}"


def _grant_credit_line(
    conn: Connection,
    settings: Settings,
    invoice: InvoiceObject,
    plan_id: str | None,
    grant: InvoiceGrant,
    *,
    user_id: int,
    now: datetime,
) -> None:
    """A metered plan's period also opens a credit line of its ceiling. It ends a second after
    the period, so it is spent after the period's included credits (soonest first) and before
    packs; what was used of it is reported to Stripe when it is over (services.overage)."""
    plan = settings.plan(plan_id or "")
    if plan is None or plan.overage != "metered" or grant.expires_at is None:
        return
    entry = ledger.grant(
        conn,
        user_id=user_id,
        credits=plan.metered_ceiling_credits,
        key=credit_line_key(invoice.id),
        reason=f"{label_of(plan)} plan: overage credit line, billed by use (invoice {invoice.id})",
        expires_at=grant.expires_at + CREDIT_LINE_LAG,
        actor="stripe",
        reference=f"stripe:{invoice.id}",
        now=now,
    )
    conn.execute(
        sa.update(invoices)
        .where(invoices.c.invoice_id == invoice.id, invoices.c.credit_line_entry_id.is_(None))
        .values(credit_line=plan.metered_ceiling_credits, credit_line_entry_id=entry.entry_id)
    )


def _grant_reason(settings: Settings, plan_id: str | None, invoice: InvoiceObject) -> str:
    plan = settings.plan(plan_id or "")
    name = label_of(plan) if plan else "plan"
    what = "upgrade" if invoice.billing_reason == "subscription_update" else "included credits"
    return f"{name} plan: {what} (invoice {invoice.id})"


def _end_earlier_periods(conn: Connection, invoice: InvoiceObject, grant: InvoiceGrant) -> None:
    """A new period has begun: the earlier periods' grants of this subscription end at its
    start. With Stripe the two dates are the same; a simulated month moves it to now."""
    assert grant.period_start is not None and grant.expires_at is not None
    others = (
        invoices.c.subscription_id == invoice.subscription_id,
        invoices.c.invoice_id != invoice.id,
    )
    earlier = sa.union(
        sa.select(invoices.c.entry_id).where(*others, invoices.c.entry_id.is_not(None)),
        sa.select(invoices.c.credit_line_entry_id).where(
            *others, invoices.c.credit_line_entry_id.is_not(None)
        ),
    )
    conn.execute(
        sa.update(credit_lots)
        .where(
            credit_lots.c.entry_id.in_(earlier),
            credit_lots.c.closed_at.is_(None),
            credit_lots.c.expires_at > grant.period_start,
            credit_lots.c.expires_at <= grant.expires_at,
        )
        .values(expires_at=grant.period_start)
    )
    conn.execute(
        sa.update(invoices)
        .where(
            invoices.c.subscription_id == invoice.subscription_id,
            invoices.c.invoice_id != invoice.id,
            invoices.c.period_end > grant.period_start,
            invoices.c.period_end <= grant.expires_at,
        )
        .values(period_end=grant.period_start)
    )


def apply_invoice_failed(
    db: Database, settings: Settings, obj: Mapping[str, Any], *, now: datetime
) -> Applied:
    """`invoice.payment_failed`: recorded for the dashboard; Stripe retries, and its
    `customer.subscription.updated` moves the subscription to past_due."""
    invoice = stripe_billing.parse_invoice(obj)
    with db.read() as conn:
        user_id = _our_user(conn, settings, invoice.customer_id, invoice.subscription_metadata)
    if user_id is None:
        return Applied("unknown_subscription")
    _, plan_id = _plan_lines(settings, invoice)
    with db.transaction() as conn:
        _record_invoice(
            conn,
            db,
            invoice,
            user_id=user_id,
            plan_id=plan_id,
            status="payment_failed",
            grant=None,
            now=now,
        )
    return Applied("payment_failed", user_id)
