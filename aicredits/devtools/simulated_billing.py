"""The simulated subscription checkout and billing portal: with no STRIPE_SECRET_KEY, and
only in development, local pages stand in for Stripe's. Each action posts correctly signed
events in Stripe's shape (`customer.subscription.*`, `invoice.paid`) to the real webhook
route, as Stripe would, so the whole subscription path runs without Stripe:

* Subscribe: `customer.subscription.created`, then the first period's `invoice.paid`.
* Change plan: `customer.subscription.updated`; an upgrade also pays a proration invoice.
* Cancel: `customer.subscription.updated` with cancel_at_period_end.
* Simulate next month: the period ends now. A renewal (`customer.subscription.updated`, then
  the new period's `invoice.paid`), or, when cancelled, `customer.subscription.deleted`.

Dev-only: every action refuses unless stripe_config.simulated_checkout_enabled, since it
gives credits for nothing.
"""

from __future__ import annotations

import logging
import secrets
import time
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from aicredits.adapters import stripe_api
from aicredits.adapters.db import Database
from aicredits.adapters.tables import stripe_customers, utcnow
from aicredits.domain.checkout_marker import METADATA_KEY
from aicredits.services import payment_trust
from aicredits.services.payment_errors import CheckoutFailed, PaymentError, PaymentsUnavailable
from aicredits.services.plans import (
    MARKER_TAG,
    SubscriptionView,
    UnknownPlan,
    current_subscription,
    simulated_price_id,
)
from aicredits.services.stripe_config import (
    simulated_checkout_enabled,
    simulated_customer_id,
    webhook_secret,
    webhook_url,
)
from aicredits.settings import Plan, Settings

logger = logging.getLogger(__name__)

MONTH_SECONDS = 30 * 86_400


def _require_enabled(settings: Settings) -> None:
    if not simulated_checkout_enabled(settings):
        raise PaymentsUnavailable("There is no simulated billing on this site.")


def _require_amount(plan: Plan) -> None:
    if plan.amount <= 0:
        raise PaymentsUnavailable(
            f"The {plan.id} plan is priced by a Stripe Price, which the simulated checkout "
            "cannot read. Give it an amount and currency to try it locally."
        )


def simulated_customer(db: Database, *, user_id: int, now: datetime) -> str:
    """The user's customer id, made once (a simulated one when they have none)."""
    with db.transaction() as conn:
        conn.execute(
            db.insert_ignoring_conflict(stripe_customers, index="user_id").values(
                user_id=user_id, customer_id=simulated_customer_id(user_id), created_at=now
            )
        )
        return str(
            conn.execute(
                sa.select(stripe_customers.c.customer_id).where(
                    stripe_customers.c.user_id == user_id
                )
            ).scalar_one()
        )


def start_simulated_subscription(
    db: Database, settings: Settings, *, user_id: int, plan: Plan, now: datetime
) -> str:
    """Where "Subscribe" sends the browser: this site's stand-in for Stripe's page."""
    _require_enabled(settings)
    _require_amount(plan)
    simulated_customer(db, user_id=user_id, now=now)
    return f"{settings.api_url}/billing/simulated/subscribe/{plan.id}"


def simulated_portal_url(settings: Settings) -> str:
    _require_enabled(settings)
    return f"{settings.api_url}/billing/simulated/portal"


def simulated_plan(settings: Settings, plan_id: str) -> Plan:
    _require_enabled(settings)
    plan = settings.plan(plan_id)
    if plan is None:
        raise UnknownPlan(f"There is no plan called {plan_id[:40]!r}.")
    _require_amount(plan)
    return plan


# --- Stripe-shaped objects --------------------------------------------------------------------


def _metadata(settings: Settings, user_id: int, plan: Plan) -> dict[str, str]:
    return {
        "user_id": str(user_id),
        "plan_id": plan.id,
        METADATA_KEY: payment_trust.new_marker(settings, user_id=user_id, pack_id=MARKER_TAG),
    }


def _subscription_object(
    sub_id: str,
    *,
    customer_id: str,
    plan: Plan,
    status: str,
    start: int,
    end: int,
    cancel_at_period_end: bool,
    metadata: dict[str, str],
) -> dict[str, Any]:
    return {
        "id": sub_id,
        "object": "subscription",
        "customer": customer_id,
        "status": status,
        "cancel_at_period_end": cancel_at_period_end,
        "livemode": False,
        "metadata": metadata,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_sim_" + sub_id.removeprefix("sub_sim_"),
                    "object": "subscription_item",
                    "price": {"id": simulated_price_id(plan), "object": "price"},
                    "quantity": 1,
                    "current_period_start": start,
                    "current_period_end": end,
                }
            ],
        },
    }


def _line(plan: Plan, amount: int, start: int, end: int, *, proration: bool) -> dict[str, Any]:
    return {
        "id": "il_sim_" + secrets.token_hex(8),
        "object": "line_item",
        "amount": amount,
        "currency": plan.currency.lower(),
        "period": {"start": start, "end": end},
        "pricing": {"price_details": {"price": simulated_price_id(plan)}},
        "parent": {"subscription_item_details": {"proration": proration}},
    }


def _invoice_object(
    *,
    customer_id: str,
    sub_id: str,
    reason: str,
    currency: str,
    lines: list[dict[str, Any]],
    metadata: dict[str, str],
) -> dict[str, Any]:
    total = max(sum(int(line["amount"]) for line in lines), 0)
    return {
        "id": "in_sim_" + secrets.token_hex(12),
        "object": "invoice",
        "customer": customer_id,
        "billing_reason": reason,
        "status": "paid",
        "amount_due": total,
        "amount_paid": total,
        "currency": currency,
        # A simulated invoice has no page at Stripe: the credits page says it is simulated.
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "parent": {
            "type": "subscription_details",
            "subscription_details": {"subscription": sub_id, "metadata": metadata},
        },
        "lines": {"object": "list", "data": lines},
    }


def _deliver(settings: Settings, event_type: str, obj: dict[str, Any]) -> None:
    secret = webhook_secret(settings)
    if secret is None:  # pragma: no cover - simulated mode always has one
        raise PaymentsUnavailable("There is no webhook secret to sign the simulated event.")
    created = int(time.time())
    body = stripe_api.simulated_event(event_type, obj, created=created)
    header = stripe_api.signature_header(body, secret, created)
    try:
        status = stripe_api.post_event(webhook_url(settings), body, header)
    except Exception as exc:  # noqa: BLE001 - any transport failure means "not delivered"
        logger.warning("simulated billing could not reach the webhook: %s", exc)
        status = 0
    if status != 200:
        raise CheckoutFailed(
            f"The simulated {event_type} was sent to {webhook_url(settings)}, which answered "
            f"{status or 'nothing'}. Try again."
        )


# --- the actions ------------------------------------------------------------------------------


def subscribe(db: Database, settings: Settings, *, user_id: int, plan_id: str) -> None:
    """ "Subscribe" on the simulated checkout."""
    plan = simulated_plan(settings, plan_id)
    if current_subscription(db, user_id=user_id) is not None:
        raise PaymentError("You already have a plan. Change or cancel it with “Manage billing”.")
    customer_id = simulated_customer(db, user_id=user_id, now=utcnow())
    sub_id = "sub_sim_" + secrets.token_hex(12)
    start = int(time.time())
    end = start + MONTH_SECONDS
    metadata = _metadata(settings, user_id, plan)
    _deliver(
        settings,
        "customer.subscription.created",
        _subscription_object(
            sub_id,
            customer_id=customer_id,
            plan=plan,
            status="active",
            start=start,
            end=end,
            cancel_at_period_end=False,
            metadata=metadata,
        ),
    )
    _deliver(
        settings,
        "invoice.paid",
        _invoice_object(
            customer_id=customer_id,
            sub_id=sub_id,
            reason="subscription_create",
            currency=plan.currency.lower(),
            lines=[_line(plan, plan.amount, start, end, proration=False)],
            metadata=metadata,
        ),
    )


def _live(db: Database, settings: Settings, user_id: int) -> tuple[SubscriptionView, Plan]:
    _require_enabled(settings)
    sub = current_subscription(db, user_id=user_id)
    if sub is None or not sub.simulated:
        raise PaymentError("There is no simulated subscription to manage. Subscribe first.")
    plan = simulated_plan(settings, sub.plan_id)
    return sub, plan


def _period(sub: SubscriptionView) -> tuple[int, int]:
    start = int(sub.current_period_start.timestamp()) if sub.current_period_start else 0
    end = int(sub.current_period_end.timestamp()) if sub.current_period_end else 0
    return start, end


def change_plan(db: Database, settings: Settings, *, user_id: int, plan_id: str) -> None:
    """ "Change plan" on the simulated portal: an upgrade pays the prorated difference now."""
    sub, old = _live(db, settings, user_id)
    new = simulated_plan(settings, plan_id)
    if new.id == old.id:
        return
    start, end = _period(sub)
    now = int(time.time())
    metadata = _metadata(settings, user_id, new)
    _deliver(
        settings,
        "customer.subscription.updated",
        _subscription_object(
            sub.subscription_id,
            customer_id=sub.customer_id,
            plan=new,
            status=sub.status,
            start=start,
            end=end,
            cancel_at_period_end=sub.cancel_at_period_end,
            metadata=metadata,
        ),
    )
    if new.included_credits <= old.included_credits or end <= now:
        return  # a downgrade: Stripe credits the difference on the next invoice
    share = (end - now) / max(end - start, 1)
    lines = [
        _line(old, -int(old.amount * share), now, end, proration=True),
        _line(new, int(new.amount * share), now, end, proration=True),
    ]
    _deliver(
        settings,
        "invoice.paid",
        _invoice_object(
            customer_id=sub.customer_id,
            sub_id=sub.subscription_id,
            reason="subscription_update",
            currency=new.currency.lower(),
            lines=lines,
            metadata=metadata,
        ),
    )


def cancel(db: Database, settings: Settings, *, user_id: int) -> None:
    """ "Cancel plan" on the simulated portal: it ends with the period, as in Stripe's."""
    sub, plan = _live(db, settings, user_id)
    start, end = _period(sub)
    _deliver(
        settings,
        "customer.subscription.updated",
        _subscription_object(
            sub.subscription_id,
            customer_id=sub.customer_id,
            plan=plan,
            status=sub.status,
            start=start,
            end=end,
            cancel_at_period_end=True,
            metadata=_metadata(settings, user_id, plan),
        ),
    )


def next_month(db: Database, settings: Settings, *, user_id: int) -> None:
    """ "Simulate next month": the period ends now, and Stripe's renewal (or, for a cancelled
    plan, its deletion) arrives."""
    sub, plan = _live(db, settings, user_id)
    start = int(time.time())
    end = start + MONTH_SECONDS
    metadata = _metadata(settings, user_id, plan)
    old_start, _ = _period(sub)
    if sub.cancel_at_period_end:
        _deliver(
            settings,
            "customer.subscription.deleted",
            _subscription_object(
                sub.subscription_id,
                customer_id=sub.customer_id,
                plan=plan,
                status="canceled",
                start=old_start,
                end=start,
                cancel_at_period_end=False,
                metadata=metadata,
            ),
        )
        return
    _deliver(
        settings,
        "customer.subscription.updated",
        _subscription_object(
            sub.subscription_id,
            customer_id=sub.customer_id,
            plan=plan,
            status="active",
            start=start,
            end=end,
            cancel_at_period_end=False,
            metadata=metadata,
        ),
    )
    _deliver(
        settings,
        "invoice.paid",
        _invoice_object(
            customer_id=sub.customer_id,
            sub_id=sub.subscription_id,
            reason="subscription_cycle",
            currency=plan.currency.lower(),
            lines=[_line(plan, plan.amount, start, end, proration=False)],
            metadata=metadata,
        ),
    )
