"""Stripe's webhook: verify each delivery on its raw body, store its event id once, and apply
it, exactly once whatever arrives twice, late, out of order or concurrently.

* An event already processed is acknowledged and ignored. Every money change is keyed
  (ledger keys, conditional UPDATEs) and each runs in one transaction, so an event that failed
  half-way (500, Stripe retries) or is delivered twice concurrently applies once.
* Checkout Session events go to fulfilment; refunds and disputes to refunds. A paid session
  the app did not create credits nothing: it is acknowledged (200, so Stripe stops retrying)
  and recorded as an unmatched payment (services.payment_trust).
* An event about a payment we cannot place yet (a refund or dispute before its session's
  completion) is parked with its payload and applied when the completion arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from aicredits.adapters import stripe_api
from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import InvalidSignature, MalformedEvent, WebhookEvent
from aicredits.adapters.stripe_cards import parse_payment_intent
from aicredits.adapters.tables import stripe_events, utcnow
from aicredits.services import (
    auto_topup,
    billing_events,
    fulfilment,
    payment_trust,
    refunds,
    thresholds,
)
from aicredits.services.fulfilment import Fulfilment, FulfilmentStatus
from aicredits.services.payment_errors import UnknownCheckoutSession
from aicredits.services.payment_trust import UnmatchedSession
from aicredits.services.purchases import purchase_of_payment
from aicredits.services.stripe_config import webhook_secret
from aicredits.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    # What handle_webhook raises before writing anything, for the route to refuse.
    "InvalidSignature",
    "MalformedEvent",
    "WebhookResult",
    "apply_parked",
    "handle_webhook",
]


@dataclass(frozen=True, slots=True)
class WebhookResult:
    event_id: str
    type: str
    outcome: str
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class _Outcome:
    name: str
    # Set when the event must wait for a payment intent we do not know yet.
    parked_on: str | None = None
    # Whose credits it took back (a refund): their usage warnings may now be due.
    debited_user: int | None = None


def handle_webhook(
    db: Database,
    settings: Settings,
    *,
    payload: bytes,
    signature: str | None,
    now: datetime | None = None,
) -> WebhookResult:
    """Verify, store once, and apply one webhook delivery.

    Raises InvalidSignature or MalformedEvent before writing anything. A database error
    propagates: nothing is marked processed, and Stripe's retry finishes the job, each money
    change being keyed so that none applies twice."""
    now = now or utcnow()
    event = stripe_api.verify_event(payload, signature, webhook_secret(settings))
    _check_shape(event)  # a signed but unreadable object is refused before any write
    with db.read() as conn:
        processed = conn.execute(
            sa.select(stripe_events.c.outcome).where(
                stripe_events.c.event_id == event.id, stripe_events.c.processed_at.is_not(None)
            )
        ).first()
    if processed is not None:
        return WebhookResult(event.id, event.type, processed.outcome, replayed=True)
    with db.transaction() as conn:
        conn.execute(
            db.insert_ignoring_conflict(stripe_events, index="event_id").values(
                event_id=event.id, type=event.type, received_at=now, outcome=""
            )
        )
    outcome = _auto_topup_outcome(db, settings, event, now) or _dispatch(db, settings, event, now)
    with db.transaction() as conn:
        conn.execute(
            sa.update(stripe_events)
            .where(stripe_events.c.event_id == event.id, stripe_events.c.processed_at.is_(None))
            .values(
                processed_at=now,
                outcome=outcome.name,
                payment_intent_id=outcome.parked_on,
                payload=event.body if outcome.parked_on else None,
            )
        )
    if outcome.parked_on:
        # The completion may have been recorded while this event was being parked; one of
        # the two always sees the other's write, and applying twice changes nothing.
        apply_parked(db, settings, outcome.parked_on, now)
    if outcome.debited_user is not None:
        thresholds.record_crossings(db, settings, user_id=outcome.debited_user, now=now)
    logger.info("stripe event %s %s: %s", event.id, event.type, outcome.name)
    return WebhookResult(event.id, event.type, outcome.name)


_SESSION_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "checkout.session.async_payment_failed",
        "checkout.session.expired",
    }
)


def _check_shape(event: WebhookEvent) -> None:
    if event.type in _SESSION_EVENTS:
        stripe_api.parse_checkout_session(event.object)
    elif event.type == "charge.refunded":
        stripe_api.parse_charge(event.object)
    elif event.type == "charge.dispute.created":
        stripe_api.parse_dispute(event.object)
    elif event.type in billing_events.EVENT_TYPES:
        billing_events.check_shape(event.type, event.object)
    elif event.type in _AUTO_TOPUP_EVENTS:
        parse_payment_intent(event.object)


# Auto top-up (services.auto_topup): its off-session PaymentIntents, and the Checkout
# Sessions in mode setup that save a card. Everything else goes to _dispatch.
_AUTO_TOPUP_EVENTS = frozenset({"payment_intent.succeeded", "payment_intent.payment_failed"})


def _auto_topup_outcome(
    db: Database, settings: Settings, event: WebhookEvent, now: datetime
) -> _Outcome | None:
    if event.type in _AUTO_TOPUP_EVENTS:
        return _Outcome(
            auto_topup.handle_payment_intent_event(
                db, settings, event_type=event.type, obj=event.object, now=now
            )
        )
    if event.type == "checkout.session.completed" and event.object.get("mode") == "setup":
        return _Outcome(
            auto_topup.record_card_setup(db, settings, session_object=event.object, now=now)
        )
    return None


def _dispatch(db: Database, settings: Settings, event: WebhookEvent, now: datetime) -> _Outcome:
    handler = _HANDLERS.get(event.type)
    if handler is None:
        return _Outcome("ignored")
    try:
        return handler(db, settings, event, now)
    except UnmatchedSession as refused:
        # Acknowledged, so Stripe stops retrying; nothing credited; kept for an admin.
        payment_trust.record_unmatched(db, refused, source="webhook", event_id=event.id, now=now)
        return _Outcome("unmatched")
    except UnknownCheckoutSession:
        logger.info("stripe event %s names an unpaid checkout session not made here", event.id)
        return _Outcome("unknown_session")


def _on_session_completed(
    db: Database, settings: Settings, event: WebhookEvent, now: datetime
) -> _Outcome:
    session = stripe_api.parse_checkout_session(event.object)
    result = fulfilment.fulfil_checkout_session(db, settings, session, now=now)
    apply_parked(db, settings, session.payment_intent_id, now)
    return _fulfilment_outcome(result)


def _on_async_payment_succeeded(
    db: Database, settings: Settings, event: WebhookEvent, now: datetime
) -> _Outcome:
    session = stripe_api.parse_checkout_session(event.object)
    result = fulfilment.fulfil_checkout_session(db, settings, session, paid=True, now=now)
    apply_parked(db, settings, session.payment_intent_id, now)
    return _fulfilment_outcome(result)


def _fulfilment_outcome(result: Fulfilment) -> _Outcome:
    if result.status == FulfilmentStatus.CREDITED:
        return _Outcome("credited" if result.newly_credited else "already_credited")
    return _Outcome(str(result.status))


def _on_async_payment_failed(
    db: Database, settings: Settings, event: WebhookEvent, now: datetime
) -> _Outcome:
    session = stripe_api.parse_checkout_session(event.object)
    marked = fulfilment.record_payment_failed(db, session, now)
    return _Outcome("failed" if marked else "already_credited")


def _on_session_expired(
    db: Database, settings: Settings, event: WebhookEvent, now: datetime
) -> _Outcome:
    session = stripe_api.parse_checkout_session(event.object)
    fulfilment.record_expired(db, session, now)
    return _Outcome("expired")


def _on_charge_refunded(
    db: Database, settings: Settings, event: WebhookEvent, now: datetime
) -> _Outcome:
    charge = stripe_api.parse_charge(event.object)
    purchase = purchase_of_payment(db, charge.payment_intent_id, charge.id)
    if purchase is None:
        if charge.payment_intent_id:
            return _Outcome("parked", parked_on=charge.payment_intent_id)
        return _Outcome("unknown_payment")
    refunds.record_refund(db, purchase, charge, now)
    return _Outcome("refund_recorded", debited_user=purchase.user_id)


def _on_dispute_created(
    db: Database, settings: Settings, event: WebhookEvent, now: datetime
) -> _Outcome:
    dispute = stripe_api.parse_dispute(event.object)
    purchase = purchase_of_payment(db, dispute.payment_intent_id, dispute.charge_id)
    if purchase is None:
        if dispute.payment_intent_id:
            return _Outcome("parked", parked_on=dispute.payment_intent_id)
        return _Outcome("unknown_payment")
    refunds.flag_dispute(db, purchase, dispute, now)
    return _Outcome("dispute_flagged")


def _on_billing_event(
    db: Database, settings: Settings, event: WebhookEvent, now: datetime
) -> _Outcome:
    # Subscriptions and their invoices: services.billing_events.
    applied = billing_events.apply_event(
        db, settings, event.type, event.object, event_created=event.created, now=now
    )
    return _Outcome(applied.outcome, debited_user=applied.user_id)


_HANDLERS: dict[str, Callable[[Database, Settings, WebhookEvent, datetime], _Outcome]] = {
    "checkout.session.completed": _on_session_completed,
    "checkout.session.async_payment_succeeded": _on_async_payment_succeeded,
    "checkout.session.async_payment_failed": _on_async_payment_failed,
    "checkout.session.expired": _on_session_expired,
    "charge.refunded": _on_charge_refunded,
    "charge.dispute.created": _on_dispute_created,
    **dict.fromkeys(billing_events.EVENT_TYPES, _on_billing_event),
}


def apply_parked(
    db: Database, settings: Settings, payment_intent_id: str | None, now: datetime
) -> None:
    """Apply the events that were waiting for this payment, now that its purchase is known.
    Each is applied in its own unit of work, as if it had just arrived."""
    if not payment_intent_id or purchase_of_payment(db, payment_intent_id, None) is None:
        return
    with db.read() as conn:
        waiting = conn.execute(
            sa.select(stripe_events.c.event_id, stripe_events.c.payload)
            .where(
                stripe_events.c.payment_intent_id == payment_intent_id,
                stripe_events.c.outcome == "parked",
            )
            .order_by(stripe_events.c.id)
        ).all()
    for event_id, body in waiting:
        outcome = _dispatch(db, settings, stripe_api.parse_event(body), now)
        with db.transaction() as conn:
            conn.execute(
                sa.update(stripe_events)
                .where(stripe_events.c.event_id == event_id, stripe_events.c.outcome == "parked")
                .values(outcome=f"late_{outcome.name}"[:32], payload=None)
            )
