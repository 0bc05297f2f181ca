"""Payment routes. Each reads the request, calls one service, and maps its typed errors to
one status and message.

POST /api/stripe/webhook                    Stripe's events, verified on the raw body
POST /checkout/start                        "Buy" (a form post): 303 to Stripe's checkout
GET  /checkout/simulated/{session_id}       the simulated checkout (no STRIPE_SECRET_KEY)
POST /checkout/simulated/{session_id}/pay   ... posts a signed event to the webhook
POST /checkout/simulated/{session_id}/cancel

The /checkout/ routes are cookie-authenticated, so the security middleware makes their POSTs
carry this site's Origin. The webhook is authenticated by its signature alone.
"""

from __future__ import annotations

import html
import logging

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from aicredits.adapters import metrics
from aicredits.api.session import signed_in_user
from aicredits.api.small_pages import error_status, payment_error_page, small_page, to_sign_in
from aicredits.devtools import simulated_checkout as simulated
from aicredits.domain.money import format_money
from aicredits.services import checkout, stripe_webhook
from aicredits.services.packs import pack_label
from aicredits.services.payment_errors import (
    PaymentError,
)
from aicredits.services.purchases import PurchaseView
from aicredits.services.runtime import get_database, run_blocking, run_blocking_to_completion
from aicredits.services.stripe_config import WEBHOOK_PATH
from aicredits.services.stripe_webhook import InvalidSignature, MalformedEvent
from aicredits.settings import Settings, get_settings

logger = logging.getLogger(__name__)

# Stripe's events are a few kilobytes; anything far larger is not one.
MAX_WEBHOOK_BYTES = 1_000_000


async def webhook(request: Request) -> Response:
    settings = get_settings()
    too_large = _json_error(413, "payload_too_large", "The body is too large to be an event.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_WEBHOOK_BYTES:
        return too_large
    payload = bytearray()
    async for chunk in request.stream():
        payload.extend(chunk)
        if len(payload) > MAX_WEBHOOK_BYTES:
            return too_large
    try:
        # Money must be settled even if Stripe hangs up half-way.
        result = await run_blocking_to_completion(
            stripe_webhook.handle_webhook,
            get_database(),
            settings,
            payload=bytes(payload),
            signature=request.headers.get("stripe-signature"),
        )
    except (InvalidSignature, MalformedEvent) as exc:
        logger.warning("refused a webhook: %s", exc)
        metrics.webhook_event(event_type="unverified", outcome=exc.code)
        return _json_error(error_status(exc), exc.code, str(exc))
    except sa.exc.SQLAlchemyError:
        # Nothing was marked processed: Stripe retries, and the retry applies it once.
        logger.exception("a webhook failed on the database; Stripe will retry it")
        metrics.webhook_event(event_type="unknown", outcome="database_error")
        return _json_error(500, "database_error", "Temporary failure; please retry.")
    metrics.webhook_event(
        event_type=result.type, outcome="replayed" if result.replayed else result.outcome
    )
    return JSONResponse({"received": True, "event": result.event_id, "outcome": result.outcome})


def _json_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def checkout_start(request: Request) -> Response:
    settings = get_settings()
    user = await signed_in_user(request, settings)
    if user is None:
        return to_sign_in(settings)
    form = await request.form()
    pack = form.get("pack")
    try:
        url = await run_blocking(
            checkout.start_checkout,
            get_database(),
            settings,
            user_id=user.id,
            pack_id=pack if isinstance(pack, str) else "",
        )
    except PaymentError as exc:
        logger.info("checkout refused for user %s: %s", user.id, exc.code)
        return payment_error_page(settings, exc)
    return RedirectResponse(url, status_code=303)


def _simulated_page(settings: Settings, purchase: PurchaseView) -> HTMLResponse:
    sid = html.escape(purchase.checkout_session_id)
    price = html.escape(format_money(purchase.amount, purchase.currency))
    pack = html.escape(pack_label(settings, purchase.pack_id))
    base = html.escape(f"{settings.api_url}/checkout/simulated/{purchase.checkout_session_id}")
    if purchase.status in ("paid", "expired"):
        done = "paid" if purchase.status == "paid" else "cancelled"
        actions = f"<p>This checkout is already {done}.</p>"
    else:
        actions = (
            f'<form method="post" action="{base}/pay"><button class="pay" id="simulated-pay" '
            f'type="submit">Pay {price}</button></form>'
            f'<form method="post" action="{base}/cancel"><button id="simulated-cancel" '
            'type="submit">Cancel</button></form>'
        )
    body = f"""<p class="sim" id="simulated-banner">SIMULATED CHECKOUT — no real payment</p>
<h1>Buy the {pack} pack</h1>
<p>{purchase.credits:,} credits for <strong id="simulated-price">{price}</strong></p>
<p>No Stripe key is configured, so this page stands in for Stripe's. "Pay" sends a signed
<code>checkout.session.completed</code> event to this site's webhook, exactly as Stripe would,
and nothing is charged anywhere.</p>
<p><small>Session <code>{sid}</code></small></p>
{actions}"""
    return small_page(settings, title="Simulated checkout", body=body)


async def simulated_checkout(request: Request) -> Response:
    settings = get_settings()
    user = await signed_in_user(request, settings)
    if user is None:
        return to_sign_in(settings)
    try:
        purchase = await run_blocking(
            simulated.simulated_checkout,
            get_database(),
            settings,
            user_id=user.id,
            session_id=request.path_params["session_id"],
        )
    except PaymentError as exc:
        return payment_error_page(settings, exc)
    return _simulated_page(settings, purchase)


async def simulated_pay(request: Request) -> Response:
    return await _simulated_action(request, simulated.pay_simulated_checkout)


async def simulated_cancel(request: Request) -> Response:
    return await _simulated_action(request, simulated.cancel_simulated_checkout)


async def _simulated_action(request: Request, action: simulated.SimulatedAction) -> Response:
    settings = get_settings()
    user = await signed_in_user(request, settings)
    if user is None:
        return to_sign_in(settings)
    try:
        url = await run_blocking(
            action,
            get_database(),
            settings,
            user_id=user.id,
            session_id=request.path_params["session_id"],
        )
    except PaymentError as exc:
        return payment_error_page(settings, exc)
    return RedirectResponse(url, status_code=303)


routes = [
    Route(WEBHOOK_PATH, webhook, methods=["POST"]),
    Route("/checkout/start", checkout_start, methods=["POST"]),
    Route("/checkout/simulated/{session_id}", simulated_checkout, methods=["GET"]),
    Route("/checkout/simulated/{session_id}/pay", simulated_pay, methods=["POST"]),
    Route("/checkout/simulated/{session_id}/cancel", simulated_cancel, methods=["POST"]),
]
