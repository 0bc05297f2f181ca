"""Subscriptions to monthly plans, on the same ledger as packs (docs/plans.md).

* Subscribing is a Stripe Checkout Session in subscription mode (or the simulated one); plan
  changes and cancellation go through Stripe's Customer Portal (or the simulated portal).
* Stripe's webhooks are the source of truth: `customer.subscription.*` events set the stored
  status, plan and period; `invoice.paid` grants the period's included credits as an expiring
  grant keyed by the invoice id (`plan-invoice:{id}`), so each invoice grants once.
* Trust, as for packs: a subscription or invoice counts only when its customer is the one the
  app made for a user and its metadata carries the app's keyed marker for that user
  (domain.checkout_marker); the plan, and so the credits, come from PLANS by the Stripe Price
  id, never from metadata. Anything else records nothing that grants credits.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters import stripe_billing
from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import StripeFailure
from aicredits.adapters.stripe_billing import InvoiceObject
from aicredits.adapters.tables import (
    credit_lots,
    invoices,
    stripe_customers,
    subscriptions,
    utcnow,
)
from aicredits.devtools import simulated_billing
from aicredits.domain import checkout_marker
from aicredits.domain.errors import InsufficientCredits
from aicredits.domain.plans import InvoiceGrant, PlanLine, invoice_grant
from aicredits.services import checkout, ledger, payment_trust
from aicredits.services.payment_errors import CheckoutFailed, PaymentError, PaymentsUnavailable
from aicredits.services.plans import (
    MARKER_TAG,
    UnknownPlan,
    current_subscription,
    label_of,
    plan_for_price,
)
from aicredits.services.stripe_config import cancel_url, stripe_client
from aicredits.settings import Settings

logger = logging.getLogger(__name__)


class QuotaExceeded(InsufficientCredits):
    """A plan user is out of credits: their plan's, any packs', any credit line's. Says which
    plan and when it resets, for the API and the chat to offer an upgrade or a pack."""

    code = "quota_exceeded"

    def __init__(
        self, *, available: int, needed: int, plan_id: str, plan: str, resets_at: datetime | None
    ) -> None:
        super().__init__(available=available, needed=needed)
        self.plan_id = plan_id
        self.plan = plan
        self.resets_at = resets_at


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
        if grant.credits <= 0 or grant.expires_at is None:
            return Applied("no_credits" if lines else "unknown_plan", user_id)
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
        if grant.period_start is not None and invoice.subscription_id:
            _end_earlier_periods(conn, invoice, grant)
    # The previous period's rest leaves now, with its `expiry` entry.
    ledger.expire_due_grants(db, now=now)
    return Applied("already_granted" if entry.replayed else "granted", user_id)


def _grant_reason(settings: Settings, plan_id: str | None, invoice: InvoiceObject) -> str:
    plan = settings.plan(plan_id or "")
    name = label_of(plan) if plan else "plan"
    what = "upgrade" if invoice.billing_reason == "subscription_update" else "included credits"
    return f"{name} plan: {what} (invoice {invoice.id})"


def _end_earlier_periods(conn: Connection, invoice: InvoiceObject, grant: InvoiceGrant) -> None:
    """A new period has begun: the earlier periods' grants of this subscription end at its
    start. With Stripe the two dates are the same; a simulated month moves it to now."""
    assert grant.period_start is not None and grant.expires_at is not None
    earlier = sa.select(invoices.c.entry_id).where(
        invoices.c.subscription_id == invoice.subscription_id,
        invoices.c.invoice_id != invoice.id,
        invoices.c.entry_id.is_not(None),
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


# --- subscribing and the portal ---------------------------------------------------------------


def start_subscription(
    db: Database, settings: Settings, *, user_id: int, plan_id: str, now: datetime | None = None
) -> str:
    """A Checkout Session in subscription mode for a plan (or the simulated one). Returns
    where to send the browser."""
    now = now or utcnow()
    plan = settings.plan(plan_id)
    if plan is None:
        raise UnknownPlan(f"There is no plan called {plan_id[:40]!r}.")
    existing = current_subscription(db, user_id=user_id)
    if existing is not None:
        raise PaymentError("You already have a plan. Change or cancel it with “Manage billing”.")
    if settings.simulated_checkout:
        return simulated_billing.start_simulated_subscription(
            db, settings, user_id=user_id, plan=plan, now=now
        )
    if not plan.price_id:
        raise PaymentsUnavailable(
            f"The {label_of(plan)} plan has no Stripe Price (price_id) yet, so it cannot be sold."
        )
    api = stripe_client(settings)
    customer_id = checkout.ensure_customer(db, api, user_id=user_id, now=now)
    request = stripe_billing.SubscriptionCheckoutRequest(
        user_id=user_id,
        plan_id=plan.id,
        price_id=plan.price_id,
        marker=payment_trust.new_marker(settings, user_id=user_id, pack_id=MARKER_TAG),
        customer_id=customer_id,
        success_url=f"{settings.public_url}/credits?subscribed=1",
        cancel_url=cancel_url(settings),
    )
    try:
        return stripe_billing.create_subscription_checkout(
            api, request, idempotency_key=f"aicredits-subscribe-{user_id}-{uuid.uuid4().hex}"
        )
    except StripeFailure as exc:
        raise CheckoutFailed(f"Stripe could not start the checkout ({exc}).") from exc


def open_billing_portal(db: Database, settings: Settings, *, user_id: int) -> str:
    """Where "Manage billing" goes: a Customer Portal session for the user's Stripe customer,
    or the simulated portal."""
    if settings.simulated_checkout:
        return simulated_billing.simulated_portal_url(settings)
    with db.read() as conn:
        customer_id = conn.execute(
            sa.select(stripe_customers.c.customer_id).where(stripe_customers.c.user_id == user_id)
        ).scalar()
    if not customer_id:
        raise PaymentError("There is no billing account yet: subscribe to a plan first.")
    try:
        return stripe_billing.create_portal_session(
            stripe_client(settings),
            customer_id=str(customer_id),
            return_url=f"{settings.public_url}/credits",
        )
    except StripeFailure as exc:
        raise CheckoutFailed(f"Stripe could not open the billing portal ({exc}).") from exc


# --- what the dashboard and the errors show ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanUsage:
    plan_id: str
    plan: str
    status: str
    period_start: datetime | None
    period_end: datetime | None  # the next reset
    cancel_at_period_end: bool
    included: int  # granted for this period (the allowance, with any upgrade)
    remaining: int
    simulated: bool

    @property
    def used(self) -> int:
        return max(self.included - self.remaining, 0)


def plan_usage(db: Database, settings: Settings, *, user_id: int) -> PlanUsage | None:
    """The user's plan this period: its allowance, what is left of it, when it resets."""
    sub = current_subscription(db, user_id=user_id)
    if sub is None:
        return None
    included = 0
    remaining = 0
    if sub.current_period_end is not None:
        with db.read() as conn:
            included = int(
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(invoices.c.credits_granted), 0)).where(
                        invoices.c.subscription_id == sub.subscription_id,
                        invoices.c.period_end == sub.current_period_end,
                    )
                ).scalar_one()
            )
        # A plan's grants all end with its period, so what ends then is what is left of them.
        remaining = sum(
            credits
            for expires_at, credits in ledger.expiring_credits(db, user_id=user_id)
            if expires_at == sub.current_period_end
        )
    plan = settings.plan(sub.plan_id)
    return PlanUsage(
        plan_id=sub.plan_id,
        plan=label_of(plan) if plan else sub.plan_id,
        status=sub.status,
        period_start=sub.current_period_start,
        period_end=sub.current_period_end,
        cancel_at_period_end=sub.cancel_at_period_end,
        included=included,
        remaining=min(remaining, included) if included else remaining,
        simulated=sub.simulated,
    )


def quota_error(
    db: Database, settings: Settings, *, user_id: int, refused: InsufficientCredits
) -> InsufficientCredits:
    """What to tell a user who is out of credits: `quota_exceeded` with their plan and its
    reset date when they have a plan; the same `insufficient_credits` otherwise."""
    sub = current_subscription(db, user_id=user_id)
    if sub is None:
        return refused
    plan = settings.plan(sub.plan_id)
    return QuotaExceeded(
        available=refused.available,
        needed=refused.needed,
        plan_id=sub.plan_id,
        plan=label_of(plan) if plan else sub.plan_id,
        resets_at=sub.current_period_end,
    )


@dataclass(frozen=True, slots=True)
class InvoiceView:
    invoice_id: str
    plan: str
    status: str
    amount: int
    currency: str
    period_start: datetime | None
    period_end: datetime | None
    credits: int
    hosted_invoice_url: str | None
    invoice_pdf: str | None
    simulated: bool
    created_at: datetime


def list_invoices(db: Database, settings: Settings, *, user_id: int) -> list[InvoiceView]:
    """The user's subscription invoices, newest first."""
    with db.read() as conn:
        rows = conn.execute(
            sa.select(invoices)
            .where(invoices.c.user_id == user_id)
            .order_by(invoices.c.created_at.desc(), invoices.c.id.desc())
            .limit(100)
        ).all()
    return [
        InvoiceView(
            invoice_id=r.invoice_id,
            plan=label_of(p) if (p := settings.plan(r.plan_id or "")) else (r.plan_id or ""),
            status=r.status,
            amount=r.amount,
            currency=r.currency,
            period_start=r.period_start,
            period_end=r.period_end,
            credits=r.credits_granted,
            hosted_invoice_url=r.hosted_invoice_url,
            invoice_pdf=r.invoice_pdf,
            simulated=r.simulated,
            created_at=r.created_at,
        )
        for r in rows
    ]
