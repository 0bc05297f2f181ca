"""The simulated checkout: with no STRIPE_SECRET_KEY, and only in development, a local page
stands in for Stripe's. "Pay" posts a signed `checkout.session.completed` event to the real
webhook route, as Stripe would, so the whole fulfilment path runs without Stripe; "Cancel"
expires the session the same way. Its sessions are purchase rows marked `simulated`, and
"retrieve the session" reads them back from there.

Dev-only: starting one, its page, Pay and Cancel all refuse unless
stripe_config.simulated_checkout_enabled, since it gives credits for nothing.
"""

from __future__ import annotations

import logging
import secrets
import time
from datetime import datetime
from typing import Any, Protocol

from aicredits.adapters import stripe_api
from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import CheckoutSession
from aicredits.services.packs import label_of
from aicredits.services.payment_errors import (
    CheckoutFailed,
    PaymentError,
    PaymentsUnavailable,
    UnknownCheckoutSession,
)
from aicredits.services.purchases import PurchaseView, get_purchase, insert_purchase
from aicredits.services.stripe_config import (
    SIMULATED_PREFIX,
    cancel_url,
    is_session_id,
    simulated_checkout_enabled,
    simulated_customer_id,
    success_url,
    webhook_secret,
    webhook_url,
)
from aicredits.settings import CreditPack, Settings

logger = logging.getLogger(__name__)


def start_simulated_checkout(
    db: Database, settings: Settings, *, user_id: int, pack: CreditPack, now: datetime
) -> str:
    """A simulated session for a pack, and its purchase row. Returns where to send the
    browser: this site's stand-in for Stripe's page."""
    if not simulated_checkout_enabled(settings):
        raise PaymentsUnavailable("Buying credits is not available on this site yet.")
    if pack.amount <= 0:
        raise PaymentsUnavailable(
            f"The {label_of(pack)} pack is priced by a Stripe Price, which the simulated "
            "checkout cannot read. Give it an amount and currency to try it locally."
        )
    session_id = SIMULATED_PREFIX + secrets.token_hex(16)
    insert_purchase(
        db,
        user_id=user_id,
        pack=pack,
        session_id=session_id,
        amount=pack.amount,
        currency=pack.currency.lower(),
        customer_id=simulated_customer_id(user_id),
        simulated=True,
        now=now,
    )
    return f"{settings.api_url}/checkout/simulated/{session_id}"


def simulated_session(row: PurchaseView, settings: Settings, *, paid: bool) -> CheckoutSession:
    """What "retrieve the session" reads in simulated mode: the local purchase."""
    return stripe_api.parse_checkout_session(_simulated_session_object(row, settings, paid=paid))


def _simulated_payment_intent(session_id: str) -> str:
    return "pi_sim_" + session_id.removeprefix(SIMULATED_PREFIX)


def _simulated_session_object(
    row: PurchaseView, settings: Settings, *, paid: bool, status: str = ""
) -> dict[str, Any]:
    """A Checkout Session as Stripe's JSON has it."""
    created = int(row.created_at.timestamp())
    metadata = {"user_id": str(row.user_id), "pack_id": row.pack_id, "credits": str(row.credits)}
    return {
        "id": row.checkout_session_id,
        "object": "checkout.session",
        "amount_subtotal": row.amount,
        "amount_total": row.amount,
        "cancel_url": cancel_url(settings),
        "client_reference_id": str(row.user_id),
        "created": created,
        "currency": row.currency,
        "customer": row.customer_id,
        "expires_at": created + 86_400,
        "livemode": False,
        "metadata": metadata,
        "mode": "payment",
        "payment_intent": _simulated_payment_intent(row.checkout_session_id) if paid else None,
        "payment_status": "paid" if paid else "unpaid",
        "status": status or ("complete" if paid else "open"),
        "success_url": success_url(settings, "{CHECKOUT_SESSION_ID}"),
        "url": None,
    }


class SimulatedAction(Protocol):
    """Pay or Cancel on the simulated checkout page: returns where the browser goes next."""

    def __call__(
        self, db: Database, settings: Settings, *, user_id: int, session_id: str
    ) -> str: ...


def simulated_checkout(
    db: Database, settings: Settings, *, user_id: int, session_id: str
) -> PurchaseView:
    """The purchase behind a simulated checkout page, if it is this user's."""
    if not simulated_checkout_enabled(settings):
        raise UnknownCheckoutSession("There is no simulated checkout on this site.")
    row = get_purchase(db, session_id=session_id) if is_session_id(session_id) else None
    if row is None or row.user_id != user_id or not row.simulated:
        raise UnknownCheckoutSession("There is no such checkout.")
    return row


def _deliver_simulated(settings: Settings, event_type: str, obj: dict[str, Any]) -> int:
    secret = webhook_secret(settings)
    if secret is None:  # pragma: no cover - simulated mode always has one
        raise PaymentsUnavailable("There is no webhook secret to sign the simulated event.")
    created = int(time.time())
    body = stripe_api.simulated_event(event_type, obj, created=created)
    header = stripe_api.signature_header(body, secret, created)
    try:
        return stripe_api.post_event(webhook_url(settings), body, header)
    except Exception as exc:  # noqa: BLE001 - any transport failure means "not delivered"
        logger.warning("the simulated checkout could not reach the webhook: %s", exc)
        return 0


def pay_simulated_checkout(
    db: Database, settings: Settings, *, user_id: int, session_id: str
) -> str:
    """ "Pay" on the simulated checkout: post a signed `checkout.session.completed` to the
    real webhook route, as Stripe would. Returns the success page's URL."""
    purchase = simulated_checkout(db, settings, user_id=user_id, session_id=session_id)
    if purchase.status == "expired":
        raise PaymentError("This checkout was cancelled. Start a new one from the credits page.")
    if purchase.status != "paid":
        status = _deliver_simulated(
            settings,
            "checkout.session.completed",
            _simulated_session_object(purchase, settings, paid=True),
        )
        if status != 200:
            raise CheckoutFailed(
                f"The simulated payment was sent to {webhook_url(settings)}, which answered "
                f"{status or 'nothing'}. Nothing was credited; try again."
            )
    return success_url(settings, session_id)


def cancel_simulated_checkout(
    db: Database, settings: Settings, *, user_id: int, session_id: str
) -> str:
    """ "Cancel" on the simulated checkout: the session expires, as Stripe's would. Returns the
    cancel page's URL."""
    purchase = simulated_checkout(db, settings, user_id=user_id, session_id=session_id)
    if purchase.status == "open":
        _deliver_simulated(
            settings,
            "checkout.session.expired",
            _simulated_session_object(purchase, settings, paid=False, status="expired"),
        )
    return cancel_url(settings)
