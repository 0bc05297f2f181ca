"""Buying a pack: start a Stripe Checkout Session with its purchase row (the user's Stripe
customer made once and reused), and the success page that Stripe sends the browser back to,
which fulfils the session through the same function as the webhook.

With no STRIPE_SECRET_KEY (development only), the simulated checkout in aicredits.devtools
stands in for Stripe's side.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa

from aicredits.adapters import stripe_api
from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import CheckoutSessionNotFound, StripeFailure
from aicredits.adapters.tables import stripe_customers, users, utcnow
from aicredits.devtools import simulated_checkout
from aicredits.services import fulfilment, payment_trust, stripe_webhook
from aicredits.services.fulfilment import Fulfilment
from aicredits.services.packs import label_of
from aicredits.services.payment_errors import (
    CheckoutFailed,
    UnknownCheckoutSession,
    UnknownPack,
)
from aicredits.services.payment_trust import UnmatchedSession
from aicredits.services.purchases import get_purchase, insert_purchase
from aicredits.services.stripe_config import (
    cancel_url,
    is_session_id,
    is_simulated_customer,
    stripe_client,
    success_url,
)
from aicredits.settings import Settings


def start_checkout(
    db: Database, settings: Settings, *, user_id: int, pack_id: str, now: datetime | None = None
) -> str:
    """Create a Checkout Session for a pack (or a simulated one) and its purchase row.
    Returns where to send the browser."""
    now = now or utcnow()
    pack = settings.pack(pack_id)
    if pack is None:
        raise UnknownPack(f"There is no credit pack called {pack_id[:40]!r}.")
    if settings.simulated_checkout:
        return simulated_checkout.start_simulated_checkout(
            db, settings, user_id=user_id, pack=pack, now=now
        )
    api = stripe_client(settings)
    customer_id = ensure_customer(db, api, user_id=user_id, now=now)
    request = stripe_api.CheckoutRequest(
        user_id=user_id,
        pack_id=pack.id,
        credits=pack.credits,
        marker=payment_trust.new_marker(settings, user_id=user_id, pack_id=pack.id),
        product_name=f"{label_of(pack)}: {pack.credits:,} credits",
        price_id=pack.price_id,
        amount=pack.amount,
        currency=pack.currency.lower(),
        customer_id=customer_id,
        success_url=success_url(settings, "{CHECKOUT_SESSION_ID}"),
        cancel_url=cancel_url(settings),
    )
    try:
        # A new key per press of "Buy": the SDK's own retries of this request reuse it.
        created = api.create_checkout_session(
            request, idempotency_key=f"aicredits-checkout-{user_id}-{uuid.uuid4().hex}"
        )
    except StripeFailure as exc:
        raise CheckoutFailed(f"Stripe could not start the checkout ({exc}).") from exc
    insert_purchase(
        db,
        user_id=user_id,
        pack=pack,
        session_id=created.id,
        amount=created.amount_total if created.amount_total is not None else pack.amount,
        currency=created.currency or pack.currency.lower(),
        customer_id=customer_id,
        simulated=False,
        now=now,
    )
    return created.url


def ensure_customer(db: Database, api: stripe_api.StripeApi, *, user_id: int, now: datetime) -> str:
    """The user's Stripe customer, created on their first checkout and reused after. A
    simulated customer (left by the simulated checkout before a Stripe key was set) is not
    Stripe's, so it is replaced by a real one, once."""
    with db.read() as conn:
        existing = conn.execute(
            sa.select(stripe_customers.c.customer_id).where(stripe_customers.c.user_id == user_id)
        ).scalar()
        email = conn.execute(sa.select(users.c.email).where(users.c.id == user_id)).scalar()
    if existing and not is_simulated_customer(str(existing)):
        return str(existing)
    try:
        created = api.create_customer(
            user_id=user_id,
            email=email,
            idempotency_key=f"aicredits-customer-{user_id}-{uuid.uuid4().hex}",
        )
    except StripeFailure as exc:
        raise CheckoutFailed(f"Stripe could not start the checkout ({exc}).") from exc
    with db.transaction() as conn:
        if existing:
            # Only the simulated one is replaced: a concurrent first checkout may have
            # replaced it already.
            conn.execute(
                sa.update(stripe_customers)
                .where(
                    stripe_customers.c.user_id == user_id,
                    stripe_customers.c.customer_id == existing,
                )
                .values(customer_id=created, created_at=now)
            )
        else:
            conn.execute(
                db.insert_ignoring_conflict(stripe_customers, index="user_id").values(
                    user_id=user_id, customer_id=created, created_at=now
                )
            )
        # A concurrent first checkout may have stored its customer first; everyone uses that.
        return str(
            conn.execute(
                sa.select(stripe_customers.c.customer_id).where(
                    stripe_customers.c.user_id == user_id
                )
            ).scalar_one()
        )


def ensure_stripe_customer(
    db: Database, settings: Settings, *, user_id: int, now: datetime | None = None
) -> str:
    """The user's Stripe customer (made once and reused): auto top-up saves cards to it."""
    return ensure_customer(db, stripe_client(settings), user_id=user_id, now=now or utcnow())


def confirm_checkout(
    db: Database, settings: Settings, *, user_id: int, session_id: str, now: datetime | None = None
) -> Fulfilment:
    """The success page: read the session back and fulfil it through the same function as
    the webhook, so a late webhook never leaves the user waiting."""
    now = now or utcnow()
    unknown = UnknownCheckoutSession(
        "We could not find that checkout. If you paid, your credits arrive as soon as Stripe "
        "confirms the payment."
    )
    if not is_session_id(session_id):
        raise unknown
    row = get_purchase(db, session_id=session_id)
    if row is not None and row.user_id != user_id:
        raise unknown  # someone else's: say no more than for a made-up id
    from_stripe = False
    if row is not None and row.simulated:
        session = simulated_checkout.simulated_session(row, settings, paid=row.status == "paid")
    elif settings.simulated_checkout:
        raise unknown
    else:
        try:
            session = stripe_client(settings).retrieve_checkout_session(session_id)
        except CheckoutSessionNotFound:
            raise unknown from None
        except StripeFailure as exc:
            raise CheckoutFailed(f"Stripe could not be asked about this payment ({exc}).") from exc
        if session.client_reference_id != str(user_id):
            raise unknown
        from_stripe = True
    try:
        # The same checks as the webhook's: a session with no row here must carry our marker,
        # be a payment and cost what its pack costs.
        result = fulfilment.fulfil_checkout_session(
            db, settings, session, from_stripe=from_stripe, now=now
        )
    except UnmatchedSession as refused:
        payment_trust.record_unmatched(db, refused, source="success_page", now=now)
        raise unknown from None
    except UnknownCheckoutSession:
        raise unknown from None
    # A refund or dispute that arrived before the payment was known applies now.
    stripe_webhook.apply_parked(db, settings, session.payment_intent_id, now)
    return result
