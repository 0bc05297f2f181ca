"""The payments trust boundary: which Checkout Sessions may credit anything.

A session the app created has a purchase row, written from the pack table when "Buy" made it;
its credits come from that row. A session with no row (its insert was lost after Stripe made
it, or it was never ours: a payment link, another product, the dashboard, a leaked key) is
read back from Stripe's API, never from the event, and adopted only when:

* it carries the app's keyed marker (domain.checkout_marker), checked in constant time;
* it is a `payment` mode session for a pack that is configured here;
* its amount and currency are that pack's price.

Its credits then come from the pack table, never from its metadata. Anything else that was
paid credits nothing and is recorded as an unmatched payment for an admin, with a WARNING and
a metric. In simulated mode there is no Stripe to ask: a session with no row is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from datetime import datetime
from typing import NoReturn

import sqlalchemy as sa

from aicredits.adapters import metrics
from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import CheckoutSession, CheckoutSessionNotFound, StripeApi
from aicredits.adapters.tables import purchases, unmatched_payments, users
from aicredits.domain import checkout_marker
from aicredits.domain.checkout_marker import MarkerClaims
from aicredits.domain.money import format_money
from aicredits.services.payment_errors import PaymentError, UnknownCheckoutSession
from aicredits.services.purchases import PurchaseView, by_session
from aicredits.services.stripe_config import stripe_client
from aicredits.services.token_hashing import hashing_key
from aicredits.settings import CreditPack, Settings

logger = logging.getLogger(__name__)

# Keeps the marker key apart from every other use of the session secret.
_MARKER_CONTEXT = b"aicredits/checkout-session-marker/v1"


class UnmatchedSession(PaymentError):
    """A paid session that matches nothing the app created: it credits nothing."""

    code = "unmatched_payment"

    def __init__(self, reason: str, detail: str, session: CheckoutSession) -> None:
        super().__init__(detail)
        self.reason = reason
        self.session = session


def marker_key(settings: Settings) -> bytes:
    """The marker's HMAC key, derived from the session secret (SESSION_SECRET, or the dev
    secret in .data/) with a context string of its own."""
    return hmac.new(hashing_key(settings), _MARKER_CONTEXT, hashlib.sha256).digest()


def new_marker(settings: Settings, *, user_id: int, pack_id: str) -> str:
    """The marker for a session about to be created."""
    return checkout_marker.make_marker(
        marker_key(settings), user_id=user_id, pack_id=pack_id, nonce=secrets.token_hex(16)
    )


def expected_price(pack: CreditPack, api: StripeApi | None) -> tuple[int, str]:
    """What a pack costs: its Stripe Price's amount when it is sold by one, else its own."""
    if pack.price_id and api is not None:
        return api.retrieve_price(pack.price_id)
    return pack.amount, pack.currency.lower()


def judge_session(
    settings: Settings, session: CheckoutSession, api: StripeApi | None
) -> tuple[MarkerClaims, CreditPack]:
    """Who and which pack a session with no purchase row is for, when it is one this app
    made for the pack's price; raises UnmatchedSession saying why not. `session` must be
    Stripe's own view of it (the API's), not an event's."""
    raw = session.metadata.get(checkout_marker.METADATA_KEY)
    if not raw:
        raise UnmatchedSession("no_marker", "the session carries no marker of this app", session)
    claims = checkout_marker.read_marker(marker_key(settings), raw)
    if claims is None:
        raise UnmatchedSession("forged_marker", "the session's marker does not check", session)
    if session.mode != "payment":
        raise UnmatchedSession(
            "not_payment_mode", f"a {session.mode or 'unknown'} mode session", session
        )
    pack = settings.pack(claims.pack_id)
    if pack is None:
        raise UnmatchedSession(
            "unknown_pack", f"no pack {claims.pack_id!r} is configured here", session
        )
    amount, currency = expected_price(pack, api)
    if (session.amount_total, session.currency) != (amount, currency):
        paid = format_money(session.amount_total or 0, session.currency or "usd")
        raise UnmatchedSession(
            "amount_mismatch",
            f"{paid} paid for the {pack.id} pack, which costs {format_money(amount, currency)}",
            session,
        )
    return claims, pack


def check_known_session(row: PurchaseView, session: CheckoutSession) -> None:
    """A session the app created must be paid in its own terms before it credits."""
    if session.mode is not None and session.mode != "payment":
        raise UnmatchedSession("not_payment_mode", f"a {session.mode} mode session", session)
    if session.amount_total is None and session.currency is None:
        return  # an event that does not say; the row's terms stand
    if (session.amount_total, session.currency) != (row.amount, row.currency.lower()):
        paid = format_money(session.amount_total or 0, session.currency or row.currency)
        raise UnmatchedSession(
            "amount_mismatch",
            f"{paid} paid for a session sold at {format_money(row.amount, row.currency)}",
            session,
        )


def adopt_session(
    db: Database,
    settings: Settings,
    session: CheckoutSession,
    *,
    from_stripe: bool,
    now: datetime,
) -> tuple[PurchaseView, CheckoutSession]:
    """The purchase row for a session the app has no row for, made from the pack table when
    Stripe's view of the session passes judge_session; and that view. `from_stripe`: the
    session was just read from Stripe's API (else it is read now).

    Raises UnmatchedSession for a paid session that fails, and UnknownCheckoutSession for an
    unpaid one (nothing was paid, so there is nothing to record)."""
    if settings.simulated_checkout:
        _refuse(session, "unknown_session", "no session with this id was started here")
    api = stripe_client(settings)
    if not from_stripe:
        try:
            session = api.retrieve_checkout_session(session.id)
        except CheckoutSessionNotFound:
            _refuse(session, "unknown_session", "Stripe has no session with this id")
    try:
        claims, pack = judge_session(settings, session, api)
    except UnmatchedSession as refused:
        _refuse(session, refused.reason, refused.message)
    with db.read() as conn:
        if conn.execute(sa.select(users.c.id).where(users.c.id == claims.user_id)).first() is None:
            _refuse(session, "unknown_user", f"the marker names user {claims.user_id}, unknown")
    logger.warning("adopting checkout session %s, whose purchase row was missing", session.id)
    with db.transaction() as conn:
        conn.execute(
            db.insert_ignoring_conflict(purchases, index="checkout_session_id").values(
                user_id=claims.user_id,
                pack_id=pack.id,
                credits=pack.credits,
                amount=session.amount_total or 0,
                currency=(session.currency or pack.currency)[:3].lower(),
                checkout_session_id=session.id,
                customer_id=session.customer_id,
                status="open",
                simulated=False,
                flagged=False,
                created_at=now,
                updated_at=now,
            )
        )
        # Inserted above, or by a concurrent call first.
        return PurchaseView.from_row(conn.execute(by_session(session.id)).one()), session


def _refuse(session: CheckoutSession, reason: str, detail: str) -> NoReturn:
    if session.payment_status == "paid":
        raise UnmatchedSession(reason, detail, session)
    raise UnknownCheckoutSession("This checkout session was not started here.")


def record_unmatched(
    db: Database,
    refused: UnmatchedSession,
    *,
    source: str,
    event_id: str | None = None,
    now: datetime,
) -> bool:
    """Keep a refused payment for an admin, log a WARNING and count it: once per session,
    however often it comes back (Stripe's retries, each daily reconciliation while it is
    open: on a Stripe account shared with other products, their paid sessions). True when
    this call recorded it."""
    session = refused.session
    with db.transaction() as conn:
        inserted = conn.execute(
            db.insert_ignoring_conflict(unmatched_payments, index="checkout_session_id")
            .values(
                checkout_session_id=session.id[:255],
                event_id=event_id,
                amount=session.amount_total,
                currency=(session.currency or "")[:8] or None,
                reason=refused.reason[:40],
                detail=refused.message[:500],
                source=source[:20],
                created_at=now,
            )
            # Not rowcount: Postgres reports -1 for an INSERT ... ON CONFLICT DO NOTHING here.
            .returning(unmatched_payments.c.id)
        ).first()
    if inserted is None:
        logger.debug("unmatched payment %s seen again (%s)", session.id, source)
        return False
    logger.warning(
        "unmatched payment: checkout session %s (event %s, %s %s) credited nothing: %s (%s)",
        session.id,
        event_id or "-",
        session.amount_total,
        session.currency,
        refused.reason,
        refused.message,
    )
    metrics.unmatched_payment(reason=refused.reason, source=source)
    return True
