"""The monthly plans for sale (PLANS), as the credits page offers them, and which plan a
Stripe Price belongs to: the only way the app decides what a subscription is worth."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import subscriptions
from aicredits.domain.money import format_money
from aicredits.domain.plans import LIVE_STATUSES
from aicredits.services.payment_errors import PaymentError
from aicredits.services.stripe_config import simulated_checkout_enabled
from aicredits.settings import Plan, Settings

# The Price ids the simulated checkout gives its subscriptions (development only).
SIMULATED_PRICE_PREFIX = "price_sim_"
# What the keyed checkout marker (domain.checkout_marker) names in place of a pack.
MARKER_TAG = "plan"


class UnknownPlan(PaymentError):
    code = "unknown_plan"


@dataclass(frozen=True, slots=True)
class PlanOffer:
    id: str
    label: str
    included_credits: int
    price: str  # "20.00 USD a month", or "" when a Stripe Price sets it
    overage: str


def label_of(plan: Plan) -> str:
    return plan.label or plan.id.replace("-", " ").replace("_", " ").title()


def plan_label(settings: Settings, plan_id: str | None) -> str:
    plan = settings.plan(plan_id or "")
    return label_of(plan) if plan else (plan_id or "")


def list_plans(settings: Settings) -> list[PlanOffer]:
    return [
        PlanOffer(
            id=p.id,
            label=label_of(p),
            included_credits=p.included_credits,
            price=f"{format_money(p.amount, p.currency)} a month" if p.amount > 0 else "",
            overage=p.overage,
        )
        for p in settings.plans
    ]


def simulated_price_id(plan: Plan) -> str:
    return SIMULATED_PRICE_PREFIX + plan.id


def plan_for_price(settings: Settings, price_id: str | None) -> Plan | None:
    """The plan sold by this Stripe Price, from PLANS. The simulated checkout's own price ids
    count only where it runs (development with no Stripe key)."""
    if not price_id:
        return None
    for plan in settings.plans:
        if plan.price_id and plan.price_id == price_id:
            return plan
    if price_id.startswith(SIMULATED_PRICE_PREFIX) and simulated_checkout_enabled(settings):
        return settings.plan(price_id.removeprefix(SIMULATED_PRICE_PREFIX))
    return None


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    subscription_id: str
    plan_id: str
    status: str
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    customer_id: str
    simulated: bool


def current_subscription(
    db: Database, *, user_id: int, simulated: bool = True
) -> SubscriptionView | None:
    """The user's live subscription (active, trialing or past due), if any; with
    `simulated=False`, only one that Stripe made."""
    with db.read() as conn:
        row = conn.execute(
            sa.select(subscriptions)
            .where(
                subscriptions.c.user_id == user_id,
                subscriptions.c.status.in_(sorted(LIVE_STATUSES)),
                *([] if simulated else [subscriptions.c.simulated.is_(False)]),
            )
            .order_by(subscriptions.c.updated_at.desc(), subscriptions.c.id.desc())
            .limit(1)
        ).first()
    if row is None:
        return None
    return SubscriptionView(
        subscription_id=row.subscription_id,
        plan_id=row.plan_id,
        status=row.status,
        current_period_start=row.current_period_start,
        current_period_end=row.current_period_end,
        cancel_at_period_end=row.cancel_at_period_end,
        customer_id=row.customer_id,
        simulated=row.simulated,
    )
