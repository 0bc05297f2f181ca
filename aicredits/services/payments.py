"""Buying credits: Stripe Checkout packs, the signed webhook, refunds and disputes.

Exactly once, whatever arrives twice, late, out of order or concurrently:

* A pack is credited once per Checkout Session id. The ledger entry's unique key
  `purchase:{session id}` decides it; the webhook and the success page both go through
  `fulfil_checkout_session`, so whichever comes first credits and the other finds it done.
* Each event id is stored once; an event already processed is acknowledged and ignored.
  Every money change is keyed (ledger keys, conditional UPDATEs), so an event that failed
  half-way (500, Stripe retries) or is delivered twice concurrently applies once.
* Refunds claw back what the refunded part bought, pro rata, from Stripe's cumulative
  `amount_refunded`, so partial refunds add up and arrive in any order. What cannot be
  taken back (already spent) is recorded as a shortfall and the account is flagged.
  A refund is settled in one transaction holding the purchase's row, because the ledger's
  clawback takes "what is available now", which two concurrent callers could see differently.
* An event about a payment we cannot place yet (a refund or dispute before its session's
  completion) is parked with its payload and applied when the completion arrives.

With no STRIPE_SECRET_KEY (development only), a simulated checkout stands in for Stripe's
page: "Pay" posts a signed `checkout.session.completed` event to the real webhook route.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters import stripe_api
from aicredits.adapters.db import Database, insert_ignoring_conflict
from aicredits.adapters.local_secret import LOCAL_DATA_DIR
from aicredits.adapters.stripe_api import (
    CheckoutSession,
    CheckoutSessionNotFound,
    InvalidSignature,
    MalformedEvent,
    StripeFailure,
    WebhookEvent,
)
from aicredits.adapters.tables import (
    account_flags,
    purchases,
    stripe_customers,
    stripe_events,
    users,
    utcnow,
)
from aicredits.domain.errors import AICreditsError
from aicredits.domain.ledger import EntryKind
from aicredits.domain.money import clawback_target, format_money, refund_due
from aicredits.services import ledger
from aicredits.settings import CreditPack, Settings

logger = logging.getLogger(__name__)

__all__ = [
    "CheckoutFailed",
    "Fulfilment",
    "FulfilmentStatus",
    "InvalidSignature",
    "MalformedEvent",
    "PackOffer",
    "PaymentError",
    "PaymentsUnavailable",
    "PurchaseView",
    "UnknownCheckoutSession",
    "UnknownPack",
    "WebhookResult",
    "confirm_checkout",
    "fulfil_checkout_session",
    "handle_webhook",
    "list_packs",
    "list_purchases",
    "start_checkout",
]

SIMULATED_PREFIX = "cs_test_sim_"
DEV_WEBHOOK_SECRET_PATH = LOCAL_DATA_DIR / "dev_webhook_secret"
WEBHOOK_PATH = "/api/stripe/webhook"
_SESSION_ID = re.compile(r"^cs_[A-Za-z0-9_]{1,150}$")


# --- errors ---------------------------------------------------------------------------------


class PaymentError(AICreditsError):
    """A purchase that cannot go ahead. `message` is safe to show."""

    code = "payment_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownPack(PaymentError):
    code = "unknown_pack"


class PaymentsUnavailable(PaymentError):
    code = "payments_unavailable"


class CheckoutFailed(PaymentError):
    code = "checkout_failed"


class UnknownCheckoutSession(PaymentError):
    code = "unknown_checkout_session"


# --- configuration --------------------------------------------------------------------------


def simulated_checkout_enabled(settings: Settings) -> bool:
    """The simulated checkout gives credits for nothing, so it never runs in production."""
    return settings.simulated_checkout and settings.environment == "dev"


def webhook_secret(settings: Settings) -> str | None:
    if settings.stripe_webhook_secret:
        return settings.stripe_webhook_secret
    if simulated_checkout_enabled(settings):
        return stripe_api.load_or_create_dev_secret(DEV_WEBHOOK_SECRET_PATH)
    return None


def _api(settings: Settings) -> stripe_api.StripeApi:
    return stripe_api.stripe_api(settings.stripe_secret_key, settings.stripe_api_base)


def success_url(settings: Settings, session_id: str) -> str:
    return f"{settings.public_url}/credits/success?session_id={session_id}"


def cancel_url(settings: Settings) -> str:
    return f"{settings.public_url}/credits/cancel"


def webhook_url(settings: Settings) -> str:
    return settings.api_url + WEBHOOK_PATH


# --- packs and history ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PackOffer:
    id: str
    label: str
    credits: int
    price: str  # "5.00 USD", or "" when a Stripe Price sets it


def _pack_label(pack: CreditPack) -> str:
    return pack.label or pack.id.replace("-", " ").replace("_", " ").title()


def pack_label(settings: Settings, pack_id: str) -> str:
    pack = settings.pack(pack_id)
    return _pack_label(pack) if pack else pack_id


def list_packs(settings: Settings) -> list[PackOffer]:
    return [
        PackOffer(
            id=p.id,
            label=_pack_label(p),
            credits=p.credits,
            price=format_money(p.amount, p.currency) if p.amount > 0 else "",
        )
        for p in settings.packs
    ]


@dataclass(frozen=True, slots=True)
class PurchaseView:
    """A purchase row, read once: what the services work from and the pages show."""

    id: int
    user_id: int
    checkout_session_id: str
    pack_id: str
    credits: int
    amount: int
    currency: str
    status: str
    amount_refunded: int
    credits_granted: int
    credits_clawed_back: int
    credits_shortfall: int
    receipt_url: str | None
    flagged: bool
    simulated: bool
    payment_intent_id: str | None
    charge_id: str | None
    customer_id: str | None
    created_at: datetime
    fulfilled_at: datetime | None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> PurchaseView:
        return cls(
            id=row.id,
            user_id=row.user_id,
            checkout_session_id=row.checkout_session_id,
            pack_id=row.pack_id,
            credits=row.credits,
            amount=row.amount,
            currency=row.currency,
            status=row.status,
            amount_refunded=row.amount_refunded,
            credits_granted=row.credits_granted,
            credits_clawed_back=row.credits_clawed_back,
            credits_shortfall=row.credits_shortfall,
            receipt_url=row.receipt_url,
            flagged=row.flagged,
            simulated=row.simulated,
            payment_intent_id=row.payment_intent_id,
            charge_id=row.charge_id,
            customer_id=row.customer_id,
            created_at=row.created_at,
            fulfilled_at=row.fulfilled_at,
        )

    @property
    def status_label(self) -> str:
        if self.status == "paid" and self.amount_refunded >= self.amount > 0:
            return "Refunded"
        if self.status == "paid" and self.amount_refunded > 0:
            return "Partly refunded"
        return {
            "open": "Awaiting payment",
            "pending": "Processing",
            "paid": "Paid",
            "failed": "Failed",
            "expired": "Not completed",
        }.get(self.status, self.status)


def list_purchases(db: Database, *, user_id: int, limit: int = 50) -> list[PurchaseView]:
    """A user's purchase history, newest first. Checkouts abandoned before paying are left
    out: nothing happened in them."""
    with db.read() as conn:
        rows = conn.execute(
            sa.select(purchases)
            .where(
                purchases.c.user_id == user_id,
                purchases.c.status.not_in(("open", "expired")),
            )
            .order_by(purchases.c.created_at.desc(), purchases.c.id.desc())
            .limit(limit)
        ).all()
    return [PurchaseView.from_row(r) for r in rows]


def get_purchase(db: Database, *, session_id: str) -> PurchaseView | None:
    with db.read() as conn:
        return _purchase_row(conn, session_id)


def _purchase_row(conn: Connection, session_id: str) -> PurchaseView | None:
    row = conn.execute(_by_session(session_id)).first()
    return None if row is None else PurchaseView.from_row(row)


def _by_session(session_id: str) -> sa.Select[Any]:
    return sa.select(purchases).where(purchases.c.checkout_session_id == session_id)


# --- starting a checkout --------------------------------------------------------------------


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
        return _start_simulated(db, settings, user_id=user_id, pack=pack, now=now)
    api = _api(settings)
    customer_id = _ensure_customer(db, api, user_id=user_id, now=now)
    request = stripe_api.CheckoutRequest(
        user_id=user_id,
        pack_id=pack.id,
        credits=pack.credits,
        product_name=f"{_pack_label(pack)}: {pack.credits:,} credits",
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
    _insert_purchase(
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


def _start_simulated(
    db: Database, settings: Settings, *, user_id: int, pack: CreditPack, now: datetime
) -> str:
    if not simulated_checkout_enabled(settings):
        raise PaymentsUnavailable("Buying credits is not available on this site yet.")
    if pack.amount <= 0:
        raise PaymentsUnavailable(
            f"The {_pack_label(pack)} pack is priced by a Stripe Price, which the simulated "
            "checkout cannot read. Give it an amount and currency to try it locally."
        )
    session_id = SIMULATED_PREFIX + secrets.token_hex(16)
    _insert_purchase(
        db,
        user_id=user_id,
        pack=pack,
        session_id=session_id,
        amount=pack.amount,
        currency=pack.currency.lower(),
        customer_id=f"cus_sim_{user_id}",
        simulated=True,
        now=now,
    )
    return f"{settings.api_url}/checkout/simulated/{session_id}"


def _insert_purchase(
    db: Database,
    *,
    user_id: int,
    pack: CreditPack,
    session_id: str,
    amount: int,
    currency: str,
    customer_id: str | None,
    simulated: bool,
    now: datetime,
) -> None:
    with db.transaction() as conn:
        conn.execute(
            db.insert_ignoring_conflict(purchases, index="checkout_session_id").values(
                user_id=user_id,
                pack_id=pack.id,
                credits=pack.credits,
                amount=amount,
                currency=currency,
                checkout_session_id=session_id,
                customer_id=customer_id,
                status="open",
                simulated=simulated,
                flagged=False,
                created_at=now,
                updated_at=now,
            )
        )


def _ensure_customer(
    db: Database, api: stripe_api.StripeApi, *, user_id: int, now: datetime
) -> str:
    """The user's Stripe customer, created on their first checkout and reused after."""
    with db.read() as conn:
        existing = conn.execute(
            sa.select(stripe_customers.c.customer_id).where(stripe_customers.c.user_id == user_id)
        ).scalar()
        email = conn.execute(sa.select(users.c.email).where(users.c.id == user_id)).scalar()
    if existing:
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


# --- fulfilment -----------------------------------------------------------------------------


class FulfilmentStatus(StrEnum):
    CREDITED = "credited"
    PROCESSING = "processing"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Fulfilment:
    status: FulfilmentStatus
    credits: int
    purchase_id: int
    # True only for the call that actually added the credits.
    newly_credited: bool = False


def purchase_key(session_id: str) -> str:
    return f"purchase:{session_id}"


def fulfil_checkout_session(
    db: Database, session: CheckoutSession, *, paid: bool | None = None, now: datetime | None = None
) -> Fulfilment:
    """Credit a Checkout Session's pack once it is paid, exactly once per session id.

    Shared by the webhook and the success page. `paid` overrides the session's own
    payment_status (async_payment_succeeded says so by its type)."""
    now = now or utcnow()
    is_paid = session.payment_status == "paid" if paid is None else paid
    found = _purchase_for_session(db, session, now)
    # One unit of work: the credit, the purchase row that records it and the settlement of
    # any refund that came first commit together or not at all.
    with db.transaction() as conn:
        purchase = _lock_purchase(conn, found.id)
        _note_payment(conn, purchase.id, session, now)
        if is_paid:
            newly = purchase.fulfilled_at is None and _grant_purchase(conn, purchase, now)
            _settle_refunds(conn, purchase.id, now)  # a refund that arrived before this completion
            result = Fulfilment(FulfilmentStatus.CREDITED, purchase.credits, purchase.id, newly)
        else:
            status = _mark_unpaid(conn, purchase.id, session, now)
            result = Fulfilment(_unpaid_status(status), purchase.credits, purchase.id)
    if session.payment_intent_id:
        _apply_parked(db, session.payment_intent_id, now)
    return result


def _lock_purchase(conn: Connection, purchase_id: int) -> PurchaseView:
    """Read a purchase and hold its row until the caller's transaction ends, so that its
    fulfilment and refund settlements run one at a time (FOR UPDATE on Postgres; SQLite
    runs one writer at a time already)."""
    row = conn.execute(
        sa.select(purchases).where(purchases.c.id == purchase_id).with_for_update()
    ).one()
    return PurchaseView.from_row(row)


def _grant_purchase(conn: Connection, purchase: PurchaseView, now: datetime) -> bool:
    """Credit the pack and record it on the purchase, in the caller's transaction; True if
    this call did. The ledger key decides "exactly once": a grant made before the purchase
    row recorded it (as older versions could leave behind) replays, and is recorded now."""
    entry = ledger.grant(
        conn,
        user_id=purchase.user_id,
        credits=purchase.credits,
        key=purchase_key(purchase.checkout_session_id),
        kind=EntryKind.PURCHASE,
        reason=f"bought the {purchase.pack_id} pack"
        + (" (simulated checkout)" if purchase.simulated else ""),
        reference=f"stripe:{purchase.checkout_session_id}",
        actor="stripe",
        now=now,
    )
    conn.execute(
        sa.update(purchases)
        .where(purchases.c.id == purchase.id, purchases.c.fulfilled_at.is_(None))
        .values(
            status="paid",
            credits_granted=purchases.c.credits,
            fulfilled_at=now,
            updated_at=now,
        )
    )
    return not entry.replayed


def _unpaid_status(status: str) -> FulfilmentStatus:
    if status == "failed":
        return FulfilmentStatus.FAILED
    if status == "expired":
        return FulfilmentStatus.CANCELLED
    if status == "paid":  # credited earlier; this is an older view of the session
        return FulfilmentStatus.CREDITED
    return FulfilmentStatus.PROCESSING


def _purchase_for_session(db: Database, session: CheckoutSession, now: datetime) -> PurchaseView:
    """The purchase row of a session. A session of ours whose row is missing (its insert was
    lost after Stripe made it) is recreated from the metadata it carries, so a payment is
    never dropped; a session that is not ours raises UnknownCheckoutSession."""
    with db.read() as conn:
        row = _purchase_row(conn, session.id)
    if row is not None:
        return row
    meta = session.metadata
    try:
        user_id = int(meta.get("user_id") or session.client_reference_id or "")
        credits = int(meta["credits"])
        pack_id = meta["pack_id"]
    except (KeyError, ValueError):
        raise UnknownCheckoutSession("This checkout session was not started here.") from None
    if credits <= 0 or not pack_id or len(pack_id) > 40:
        raise UnknownCheckoutSession("This checkout session was not started here.")
    with db.read() as conn:
        if conn.execute(sa.select(users.c.id).where(users.c.id == user_id)).first() is None:
            raise UnknownCheckoutSession("This checkout session names no known user.")
    logger.warning("recreating the missing purchase of checkout session %s", session.id)
    with db.transaction() as conn:
        conn.execute(
            db.insert_ignoring_conflict(purchases, index="checkout_session_id").values(
                user_id=user_id,
                pack_id=pack_id,
                credits=credits,
                amount=session.amount_total or 0,
                currency=(session.currency or "usd")[:3],
                checkout_session_id=session.id,
                customer_id=session.customer_id,
                status="open",
                simulated=session.id.startswith(SIMULATED_PREFIX),
                flagged=False,
                created_at=now,
                updated_at=now,
            )
        )
        # Inserted above, or by a concurrent call first.
        return PurchaseView.from_row(conn.execute(_by_session(session.id)).one())


def _note_payment(
    conn: Connection, purchase_id: int, session: CheckoutSession, now: datetime
) -> None:
    """Keep the payment's Stripe ids and receipt, where the session tells us them."""
    known = {
        "payment_intent_id": session.payment_intent_id,
        "charge_id": session.charge_id,
        "customer_id": session.customer_id,
        "receipt_url": session.receipt_url,
    }
    values = {k: sa.func.coalesce(purchases.c[k], v) for k, v in known.items() if v}
    if not values:
        return
    missing = [purchases.c[k].is_(None) for k in values]
    conn.execute(
        sa.update(purchases)
        .where(purchases.c.id == purchase_id, sa.or_(*missing))
        .values(**values, updated_at=now)
    )


def _mark_unpaid(
    conn: Connection, purchase_id: int, session: CheckoutSession, now: datetime
) -> str:
    """A completed but unpaid session is waiting for its payment (a bank debit, say).
    Returns the purchase's status; a paid or failed purchase is never moved back."""
    if session.status == "complete":
        conn.execute(
            sa.update(purchases)
            .where(purchases.c.id == purchase_id, purchases.c.status.in_(("open", "expired")))
            .values(status="pending", updated_at=now)
        )
    return str(
        conn.execute(
            sa.select(purchases.c.status).where(purchases.c.id == purchase_id)
        ).scalar_one()
    )


def confirm_checkout(
    db: Database, settings: Settings, *, user_id: int, session_id: str, now: datetime | None = None
) -> Fulfilment:
    """The success page: read the session back and fulfil it through the same function as
    the webhook, so a late webhook never leaves the user waiting."""
    unknown = UnknownCheckoutSession(
        "We could not find that checkout. If you paid, your credits arrive as soon as Stripe "
        "confirms the payment."
    )
    if not _SESSION_ID.match(session_id or ""):
        raise unknown
    with db.read() as conn:
        row = _purchase_row(conn, session_id)
    if row is not None and row.user_id != user_id:
        raise unknown  # someone else's: say no more than for a made-up id
    if row is not None and row.simulated:
        session = _simulated_session(row, settings, paid=row.status == "paid")
    elif settings.simulated_checkout:
        raise unknown
    else:
        try:
            session = _api(settings).retrieve_checkout_session(session_id)
        except CheckoutSessionNotFound:
            raise unknown from None
        except StripeFailure as exc:
            raise CheckoutFailed(f"Stripe could not be asked about this payment ({exc}).") from exc
        if session.client_reference_id != str(user_id):
            raise unknown
    try:
        return fulfil_checkout_session(db, session, now=now)
    except UnknownCheckoutSession:
        raise unknown from None


# --- the webhook ----------------------------------------------------------------------------


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


def handle_webhook(
    db: Database,
    settings: Settings,
    *,
    payload: bytes,
    signature: str | None,
    now: datetime | None = None,
) -> WebhookResult:
    """Verify, store once, and apply one webhook delivery.

    Raises InvalidSignature or MalformedEvent (400) before writing anything. A database
    error propagates (500): nothing is marked processed, and Stripe's retry finishes the
    job, each money change being keyed so that none applies twice."""
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
    outcome = _dispatch(db, event, now)
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
        _apply_parked(db, outcome.parked_on, now)
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


def _dispatch(db: Database, event: WebhookEvent, now: datetime) -> _Outcome:
    handler = _HANDLERS.get(event.type)
    if handler is None:
        return _Outcome("ignored")
    try:
        return handler(db, event, now)
    except UnknownCheckoutSession:
        logger.warning("stripe event %s names a checkout session not made here", event.id)
        return _Outcome("unknown_session")


def _on_session_completed(db: Database, event: WebhookEvent, now: datetime) -> _Outcome:
    session = stripe_api.parse_checkout_session(event.object)
    return _fulfilment_outcome(fulfil_checkout_session(db, session, now=now))


def _on_async_payment_succeeded(db: Database, event: WebhookEvent, now: datetime) -> _Outcome:
    session = stripe_api.parse_checkout_session(event.object)
    return _fulfilment_outcome(fulfil_checkout_session(db, session, paid=True, now=now))


def _fulfilment_outcome(result: Fulfilment) -> _Outcome:
    if result.status == FulfilmentStatus.CREDITED:
        return _Outcome("credited" if result.newly_credited else "already_credited")
    return _Outcome(str(result.status))


def _on_async_payment_failed(db: Database, event: WebhookEvent, now: datetime) -> _Outcome:
    session = stripe_api.parse_checkout_session(event.object)
    purchase = _purchase_for_session(db, session, now)
    with db.transaction() as conn:
        _note_payment(conn, purchase.id, session, now)
        changed = conn.execute(
            sa.update(purchases)
            .where(purchases.c.id == purchase.id, purchases.c.fulfilled_at.is_(None))
            .values(status="failed", updated_at=now)
        ).rowcount
    return _Outcome("failed" if changed else "already_credited")


def _on_session_expired(db: Database, event: WebhookEvent, now: datetime) -> _Outcome:
    session = stripe_api.parse_checkout_session(event.object)
    purchase = _purchase_for_session(db, session, now)
    with db.transaction() as conn:
        conn.execute(
            sa.update(purchases)
            .where(purchases.c.id == purchase.id, purchases.c.status == "open")
            .values(status="expired", updated_at=now)
        )
    return _Outcome("expired")


def _purchase_by_payment(
    db: Database, payment_intent_id: str | None, charge_id: str | None
) -> PurchaseView | None:
    conditions = []
    if payment_intent_id:
        conditions.append(purchases.c.payment_intent_id == payment_intent_id)
    if charge_id:
        conditions.append(purchases.c.charge_id == charge_id)
    if not conditions:
        return None
    with db.read() as conn:
        row = conn.execute(
            sa.select(purchases).where(sa.or_(*conditions)).order_by(purchases.c.id)
        ).first()
    return None if row is None else PurchaseView.from_row(row)


def _on_charge_refunded(db: Database, event: WebhookEvent, now: datetime) -> _Outcome:
    charge = stripe_api.parse_charge(event.object)
    purchase = _purchase_by_payment(db, charge.payment_intent_id, charge.id)
    if purchase is None:
        if charge.payment_intent_id:
            return _Outcome("parked", parked_on=charge.payment_intent_id)
        return _Outcome("unknown_payment")
    # One unit of work: the refund, what it takes back and any shortfall it leaves.
    with db.transaction() as conn:
        _lock_purchase(conn, purchase.id)
        # Stripe's amount_refunded is cumulative: keep the largest seen, so partial refunds
        # arriving out of order end in the same place.
        conn.execute(
            sa.update(purchases)
            .where(
                purchases.c.id == purchase.id, purchases.c.amount_refunded < charge.amount_refunded
            )
            .values(amount_refunded=charge.amount_refunded, updated_at=now)
        )
        conn.execute(
            sa.update(purchases)
            .where(purchases.c.id == purchase.id)
            .values(
                charge_id=sa.func.coalesce(purchases.c.charge_id, charge.id),
                receipt_url=sa.func.coalesce(purchases.c.receipt_url, charge.receipt_url),
            )
        )
        _settle_refunds(conn, purchase.id, now)
    return _Outcome("refund_recorded")


def _on_dispute_created(db: Database, event: WebhookEvent, now: datetime) -> _Outcome:
    dispute = stripe_api.parse_dispute(event.object)
    purchase = _purchase_by_payment(db, dispute.payment_intent_id, dispute.charge_id)
    if purchase is None:
        if dispute.payment_intent_id:
            return _Outcome("parked", parked_on=dispute.payment_intent_id)
        return _Outcome("unknown_payment")
    at_stake = clawback_target(
        credits=purchase.credits, amount=purchase.amount, amount_refunded=dispute.amount
    )
    with db.transaction() as conn:
        conn.execute(
            db.insert_ignoring_conflict(account_flags, index="idempotency_key").values(
                user_id=purchase.user_id,
                kind="dispute",
                purchase_id=purchase.id,
                detail=(
                    f"Dispute {dispute.id} ({dispute.reason}) of "
                    f"{format_money(dispute.amount, dispute.currency or purchase.currency)} on "
                    f"the {purchase.pack_id} pack bought with {purchase.checkout_session_id}"
                )[:500],
                amount=at_stake,
                idempotency_key=f"dispute:{dispute.id}"[:200],
                created_at=now,
            )
        )
        conn.execute(
            sa.update(purchases)
            .where(purchases.c.id == purchase.id)
            .values(flagged=True, updated_at=now)
        )
    return _Outcome("dispute_flagged")


_HANDLERS: dict[str, Callable[[Database, WebhookEvent, datetime], _Outcome]] = {
    "checkout.session.completed": _on_session_completed,
    "checkout.session.async_payment_succeeded": _on_async_payment_succeeded,
    "checkout.session.async_payment_failed": _on_async_payment_failed,
    "checkout.session.expired": _on_session_expired,
    "charge.refunded": _on_charge_refunded,
    "charge.dispute.created": _on_dispute_created,
}


def _apply_parked(db: Database, payment_intent_id: str, now: datetime) -> None:
    """Apply the events that were waiting for this payment, now that its purchase is known."""
    if _purchase_by_payment(db, payment_intent_id, None) is None:
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
        outcome = _dispatch(db, stripe_api.parse_event(body), now)
        with db.transaction() as conn:
            conn.execute(
                sa.update(stripe_events)
                .where(stripe_events.c.event_id == event_id, stripe_events.c.outcome == "parked")
                .values(outcome=f"late_{outcome.name}"[:32], payload=None)
            )


# --- refunds --------------------------------------------------------------------------------


def _refund_due(row: PurchaseView) -> int:
    return refund_due(
        credits_granted=row.credits_granted,
        amount=row.amount,
        amount_refunded=row.amount_refunded,
        clawed_back=row.credits_clawed_back,
        shortfall=row.credits_shortfall,
    )


def _settle_refunds(conn: Connection, purchase_id: int, now: datetime) -> None:
    """Take back the credits the refunds so far bought, as far as the balance allows; record
    the rest as a shortfall and flag the account. Nothing to do until the pack is credited.

    In the caller's transaction, holding the purchase's row: the ledger's clawback takes
    "what is available now", which two concurrent settlements could each see whole."""
    while (due := _refund_due(row := _lock_purchase(conn, purchase_id))) > 0:
        _settle_refund_step(conn, row, due, now)


def _settle_refund_step(conn: Connection, row: PurchaseView, due: int, now: datetime) -> None:
    settled = row.credits_clawed_back + row.credits_shortfall
    # Keyed by where this step starts: a clawback entry committed without its counters (as
    # older versions could leave behind) replays instead of taking twice.
    key = f"clawback:{row.checkout_session_id}:{settled}"
    result = ledger.clawback(
        conn,
        user_id=row.user_id,
        credits=due,
        key=key,
        reason=(
            f"refund of {format_money(row.amount_refunded, row.currency)} of "
            f"{format_money(row.amount, row.currency)} for the {row.pack_id} pack"
        ),
        reference=f"stripe:{row.checkout_session_id}",
        actor="stripe",
        now=now,
    )
    replayed = result.entry is not None and result.entry.replayed
    # A replayed step took what it took; whatever it could not is tried again next round.
    shortfall = 0 if replayed else due - result.taken
    conn.execute(
        sa.update(purchases)
        .where(purchases.c.id == row.id)
        .values(
            credits_clawed_back=purchases.c.credits_clawed_back + result.taken,
            credits_shortfall=purchases.c.credits_shortfall + shortfall,
            updated_at=now,
            **({"flagged": True} if shortfall else {}),
        )
    )
    if shortfall:
        conn.execute(
            insert_ignoring_conflict(
                conn.dialect.name, account_flags, index="idempotency_key"
            ).values(
                user_id=row.user_id,
                kind="refund_shortfall",
                purchase_id=row.id,
                detail=(
                    f"A refund of {format_money(row.amount_refunded, row.currency)} on the "
                    f"{row.pack_id} pack ({row.checkout_session_id}) called for {due:,} "
                    f"credits back; {result.taken:,} were taken and {shortfall:,} were "
                    "already spent or in use."
                )[:500],
                amount=shortfall,
                idempotency_key=f"shortfall:{row.checkout_session_id}:{settled}"[:200],
                created_at=now,
            )
        )


# --- the simulated checkout -----------------------------------------------------------------


def _simulated_session(row: PurchaseView, settings: Settings, *, paid: bool) -> CheckoutSession:
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
    with db.read() as conn:
        row = _purchase_row(conn, session_id) if _SESSION_ID.match(session_id) else None
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
