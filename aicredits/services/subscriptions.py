"""Subscriptions to monthly plans, on the same ledger as packs (docs/plans.md): subscribing
(a Stripe Checkout Session in subscription mode, or the simulated one), "Manage billing"
(Stripe's Customer Portal, or the simulated one), and what the credits page and the errors
say about a user's plan. Stripe's events about them: services.billing_events.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from aicredits.adapters import stripe_billing
from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import StripeFailure
from aicredits.adapters.tables import (
    invoices,
    stripe_customers,
    utcnow,
)
from aicredits.devtools import simulated_billing
from aicredits.domain.errors import AICreditsError, InsufficientCredits
from aicredits.domain.plans import plan_is_usable
from aicredits.services import checkout, ledger, payment_trust
from aicredits.services.billing_events import CREDIT_LINE_LAG
from aicredits.services.payment_errors import CheckoutFailed, PaymentError, PaymentsUnavailable
from aicredits.services.plans import (
    MARKER_TAG,
    PlanOffer,
    SubscriptionView,
    UnknownPlan,
    current_subscription,
    label_of,
    list_plans,
)
from aicredits.services.stripe_config import cancel_url, is_simulated_customer, stripe_client
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

    @property
    def resets_on(self) -> str:
        return self.resets_at.strftime("%Y-%m-%d") if self.resets_at else "the next renewal"

    def __str__(self) -> str:
        return (
            f"quota exceeded: the {self.plan} plan's credits are used up until {self.resets_on} "
            f"({self.needed} needed, {self.available} available)"
        )


# --- subscribing and the portal ---------------------------------------------------------------


def users_plan(db: Database, settings: Settings, *, user_id: int) -> SubscriptionView | None:
    """The user's live subscription. Once a Stripe key is set, a simulated one (left in a
    development database by the simulated checkout) is not a plan any more: Stripe cannot
    renew, change or cancel it, so it no longer blocks subscribing, shows on the credits page
    or speaks for the user's credits. The credits it granted stay until they expire."""
    return current_subscription(db, user_id=user_id, simulated=settings.simulated_checkout)


def start_subscription(
    db: Database, settings: Settings, *, user_id: int, plan_id: str, now: datetime | None = None
) -> str:
    """A Checkout Session in subscription mode for a plan (or the simulated one). Returns
    where to send the browser."""
    now = now or utcnow()
    plan = settings.plan(plan_id)
    if plan is None:
        raise UnknownPlan(f"There is no plan called {plan_id[:40]!r}.")
    existing = users_plan(db, settings, user_id=user_id)
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
        sub = users_plan(db, settings, user_id=user_id)
        if sub is not None and not sub.simulated:
            # Made through Stripe, and the key removed since (development): the simulated
            # portal could not change it, and would say there is no plan.
            raise PaymentError(
                "Your plan was made through Stripe, and STRIPE_SECRET_KEY is not set: "
                "set it again to manage the plan."
            )
        return simulated_billing.simulated_portal_url(settings)
    with db.read() as conn:
        customer_id = conn.execute(
            sa.select(stripe_customers.c.customer_id).where(stripe_customers.c.user_id == user_id)
        ).scalar()
    if not customer_id or is_simulated_customer(str(customer_id)):
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
    # A metered plan's credit line this period, and what was used of it.
    overage_ceiling: int = 0
    overage_used: int = 0

    @property
    def used(self) -> int:
        return max(self.included - self.remaining, 0)


def plan_usage(db: Database, settings: Settings, *, user_id: int) -> PlanUsage | None:
    """The user's plan this period: its allowance, what is left of it, when it resets."""
    sub = users_plan(db, settings, user_id=user_id)
    if sub is None:
        return None
    included = remaining = ceiling = line_left = 0
    if sub.current_period_end is not None:
        end = sub.current_period_end
        with db.read() as conn:
            granted = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(invoices.c.credits_granted), 0),
                    sa.func.coalesce(sa.func.sum(invoices.c.credit_line), 0),
                ).where(
                    invoices.c.subscription_id == sub.subscription_id,
                    invoices.c.period_end == end,
                )
            ).one()
        included, ceiling = int(granted[0]), int(granted[1])
        # A plan's grants all end with its period (its credit line a second later), so what
        # ends then is what is left of them.
        left = ledger.expiring_credits(db, user_id=user_id)
        remaining = sum(credits for expires_at, credits in left if expires_at == end)
        line_left = sum(
            credits for expires_at, credits in left if expires_at == end + CREDIT_LINE_LAG
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
        overage_ceiling=ceiling,
        overage_used=max(ceiling - line_left, 0),
    )


def quota_error(
    db: Database, settings: Settings, *, user_id: int, refused: InsufficientCredits
) -> InsufficientCredits:
    """What to tell a user who is out of credits: `quota_exceeded` with their plan and its
    reset date when they have a plan; the same `insufficient_credits` otherwise."""
    sub = users_plan(db, settings, user_id=user_id)
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


class PlanPastDue(AICreditsError):
    """A plan whose payment failed, and whose policy stops usage while Stripe retries it."""

    code = "plan_past_due"

    def __init__(self, *, plan: str) -> None:
        super().__init__(
            f"the last payment for the {plan} plan failed; usage is paused until it is paid"
        )
        self.plan = plan


def past_due_may_block(settings: Settings) -> bool:
    """Whether any plan stops usage while past due (otherwise no call needs to ask)."""
    return any(not p.usable_when_past_due for p in settings.plans)


def check_plan_usable(db: Database, settings: Settings, *, user_id: int) -> None:
    """Raise PlanPastDue when the user's plan is past due and its policy pauses usage."""
    sub = users_plan(db, settings, user_id=user_id)
    if sub is None:
        return
    plan = settings.plan(sub.plan_id)
    if plan is not None and not plan_is_usable(
        sub.status, usable_when_past_due=plan.usable_when_past_due
    ):
        raise PlanPastDue(plan=label_of(plan))


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


@dataclass(frozen=True, slots=True)
class BillingPage:
    """What the credits page shows about plans: the user's plan, the plans for sale, and
    the subscription invoices."""

    usage: PlanUsage | None
    offers: list[PlanOffer]
    invoices: list[InvoiceView]
    usable_when_past_due: bool


def billing_page(db: Database, settings: Settings, *, user_id: int) -> BillingPage:
    usage = plan_usage(db, settings, user_id=user_id)
    plan = settings.plan(usage.plan_id) if usage else None
    return BillingPage(
        usage=usage,
        offers=list_plans(settings),
        invoices=list_invoices(db, settings, user_id=user_id),
        usable_when_past_due=plan.usable_when_past_due if plan else True,
    )
