"""Plan routes (docs/plans.md). Each reads the request, calls one service, and maps its typed
errors as api/stripe_routes.py does.

POST /billing/subscribe                      "Subscribe" (a form post): 303 to Stripe Checkout
POST /billing/portal                         "Manage billing": 303 to Stripe's Customer Portal
GET  /billing/simulated/subscribe/{plan_id}  the simulated subscription checkout (dev, no key)
POST /billing/simulated/subscribe/{plan_id}  ... posts signed events to the webhook
GET  /billing/simulated/portal               the simulated portal: change plan, cancel,
POST /billing/simulated/change                 "Simulate next month"
POST /billing/simulated/cancel
POST /billing/simulated/next-month

All are cookie-authenticated: the security middleware makes their POSTs carry this site's
Origin, and each simulated one refuses outside development with no Stripe key.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from aicredits.api.session import signed_in_user
from aicredits.api.small_pages import payment_error_page, small_page, to_sign_in
from aicredits.devtools import simulated_billing
from aicredits.domain.money import format_money
from aicredits.services import subscriptions
from aicredits.services.payment_errors import PaymentError
from aicredits.services.plans import current_subscription, label_of
from aicredits.services.runtime import get_database, run_blocking
from aicredits.settings import get_settings

logger = logging.getLogger(__name__)

SIMULATED_BANNER = (
    '<p class="sim" id="simulated-banner">SIMULATED BILLING — no real payment, '
    "no real subscription</p>"
)


async def _form_value(request: Request, name: str) -> str:
    value = (await request.form()).get(name)
    return value if isinstance(value, str) else ""


async def _redirecting(request: Request, action: Callable[..., str], **kw: Any) -> Response:
    settings = get_settings()
    user = await signed_in_user(request, settings)
    if user is None:
        return to_sign_in(settings)
    try:
        url = await run_blocking(action, get_database(), settings, user_id=user.id, **kw)
    except PaymentError as exc:
        logger.info("billing refused for user %s: %s", user.id, exc.code)
        return payment_error_page(settings, exc)
    return RedirectResponse(url, status_code=303)


async def subscribe(request: Request) -> Response:
    plan = await _form_value(request, "plan")
    return await _redirecting(request, subscriptions.start_subscription, plan_id=plan)


async def portal(request: Request) -> Response:
    return await _redirecting(request, subscriptions.open_billing_portal)


async def simulated_subscribe_page(request: Request) -> Response:
    settings = get_settings()
    user = await signed_in_user(request, settings)
    if user is None:
        return to_sign_in(settings)
    try:
        plan = simulated_billing.simulated_plan(settings, request.path_params["plan_id"])
    except PaymentError as exc:
        return payment_error_page(settings, exc)
    price = html.escape(format_money(plan.amount, plan.currency))
    action = html.escape(f"{settings.api_url}/billing/simulated/subscribe/{plan.id}")
    body = f"""{SIMULATED_BANNER}
<h1>Subscribe to the {html.escape(label_of(plan))} plan</h1>
<p>{plan.included_credits:,} credits a month for <strong id="simulated-price">{price}</strong>
a month</p>
<p>No Stripe key is configured, so this page stands in for Stripe's. "Subscribe" sends signed
<code>customer.subscription.created</code> and <code>invoice.paid</code> events to this site's
webhook, exactly as Stripe would, and nothing is charged anywhere.</p>
<form method="post" action="{action}"><button class="pay" id="simulated-subscribe"
type="submit">Subscribe for {price} a month</button></form>"""
    return small_page(settings, title="Simulated subscription checkout", body=body)


def _done(action: Callable[..., None]) -> Callable[..., str]:
    def run(db: Any, settings: Any, **kw: Any) -> str:
        action(db, settings, **kw)
        return f"{settings.public_url}/credits"

    return run


async def simulated_subscribe(request: Request) -> Response:
    return await _redirecting(
        request, _done(simulated_billing.subscribe), plan_id=request.path_params["plan_id"]
    )


async def simulated_portal_page(request: Request) -> Response:
    settings = get_settings()
    user = await signed_in_user(request, settings)
    if user is None:
        return to_sign_in(settings)
    try:
        simulated_billing.simulated_portal_url(settings)
    except PaymentError as exc:
        return payment_error_page(settings, exc)
    sub = await run_blocking(current_subscription, get_database(), user_id=user.id)
    base = html.escape(f"{settings.api_url}/billing/simulated")
    if sub is None or not sub.simulated:
        actions = "<p>You have no simulated plan. Subscribe from the credits page.</p>"
    else:
        current = settings.plan(sub.plan_id)
        ends = sub.current_period_end.date().isoformat() if sub.current_period_end else "?"
        switches = "".join(
            f'<form method="post" action="{base}/change"><input type="hidden" name="plan" '
            f'value="{html.escape(p.id)}"><button id="simulated-change-{html.escape(p.id)}" '
            f'type="submit">Switch to {html.escape(label_of(p))}</button></form>'
            for p in settings.plans
            if p.id != sub.plan_id and p.amount > 0
        )
        cancel = (
            f"<p>Cancelled: it ends on {ends}.</p>"
            if sub.cancel_at_period_end
            else f'<form method="post" action="{base}/cancel"><button id="simulated-cancel" '
            'type="submit">Cancel plan</button></form>'
        )
        actions = f"""<p>Plan: <strong id="simulated-plan">{
            html.escape(label_of(current) if current else sub.plan_id)
        }</strong> ({html.escape(sub.status)}), this period ends {ends}.</p>
<p>{switches}</p>{cancel}
<h2>Development</h2>
<p>End this period now, as if a month had passed: Stripe's renewal (a signed
<code>invoice.paid</code>) or, for a cancelled plan, its end.</p>
<form method="post" action="{base}/next-month"><button class="pay" id="simulate-next-month"
type="submit">Simulate next month</button></form>"""
    body = f"""{SIMULATED_BANNER}
<h1>Billing portal</h1>
<p>No Stripe key is configured, so this page stands in for Stripe's Customer Portal. Each
button sends signed events to this site's webhook, exactly as Stripe would.</p>
{actions}"""
    return small_page(settings, title="Simulated billing portal", body=body)


async def simulated_change(request: Request) -> Response:
    plan = await _form_value(request, "plan")
    return await _redirecting(request, _done(simulated_billing.change_plan), plan_id=plan)


async def simulated_cancel(request: Request) -> Response:
    return await _redirecting(request, _done(simulated_billing.cancel))


async def simulated_next_month(request: Request) -> Response:
    return await _redirecting(request, _done(simulated_billing.next_month))


routes = [
    Route("/billing/subscribe", subscribe, methods=["POST"]),
    Route("/billing/portal", portal, methods=["POST"]),
    Route("/billing/simulated/subscribe/{plan_id}", simulated_subscribe_page, methods=["GET"]),
    Route("/billing/simulated/subscribe/{plan_id}", simulated_subscribe, methods=["POST"]),
    Route("/billing/simulated/portal", simulated_portal_page, methods=["GET"]),
    Route("/billing/simulated/change", simulated_change, methods=["POST"]),
    Route("/billing/simulated/cancel", simulated_cancel, methods=["POST"]),
    Route("/billing/simulated/next-month", simulated_next_month, methods=["POST"]),
]
