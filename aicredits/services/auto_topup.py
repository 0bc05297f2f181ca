"""Auto top-up: when a user's available credits fall below their threshold, their saved card
buys the pack they chose, off the request path.

* **Trigger.** The job (`run_due`, every AUTO_TOPUP_INTERVAL_SECONDS, under the job lock)
  finds the enabled accounts whose available credits are below their threshold. Nothing is
  added to the metered path: a chat turn only spends, as always. A top-up starts by one
  transaction that inserts its row, keyed by a fresh trigger id, and the purchase row it will
  be credited through; a unique index allows one in flight per user, and the monthly cap is
  counted in the same transaction, under the settings row's lock.
* **Charge.** An off-session PaymentIntent (`confirm`, `off_session`) whose Stripe
  idempotency key is the trigger id: a top-up retried after a crash or a timeout gets Stripe's
  first answer, never a second charge. The amount and the credits come from our pack table,
  fixed on the row when the top-up starts.
* **Fulfilment.** Whichever comes first, the job's own answer (or read-back) or the verified
  `payment_intent.succeeded` event, credits the purchase through the same function and
  ledger key as a Checkout purchase, once. A PaymentIntent this app did not create (we have
  no row for it) credits nothing. Refunds and disputes then find the purchase by its
  PaymentIntent, like any other.
* **Failure.** A decline, an expired card, or a card that needs authentication: the banner on
  /credits and an email (the outbox) say so, with a link to buy the pack on Stripe's page
  when the bank wants the customer there; the next try waits AUTO_TOPUP_RETRY_MINUTES, and
  after AUTO_TOPUP_MAX_FAILURES in a row auto top-up turns itself off and says so.
* **Simulated mode** (no Stripe key, development only): a simulated card
  (aicredits.devtools.simulated_card), whose next charge a dev-only switch can make fail.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import StripeFailure
from aicredits.adapters.stripe_cards import (
    FAILED,
    PROCESSING,
    REQUIRES_ACTION,
    SUCCEEDED,
    OffSessionPayment,
    OffSessionRequest,
    SavedCard,
    parse_payment_intent,
    parse_setup_session,
    stripe_cards,
)
from aicredits.adapters.tables import (
    auto_topup_settings,
    auto_topups,
    credit_accounts,
    purchases,
    stripe_customers,
    users,
    utcnow,
)
from aicredits.devtools import simulated_card
from aicredits.domain import auto_topup as rules
from aicredits.domain.auto_topup import InvalidAutoTopUp, Notice, suggested_threshold
from aicredits.domain.money import format_money
from aicredits.services import fulfilment, outbox, thresholds
from aicredits.services.packs import label_of
from aicredits.services.payment_errors import CheckoutFailed, PaymentsUnavailable
from aicredits.services.stripe_config import simulated_checkout_enabled
from aicredits.settings import CreditPack, Settings

logger = logging.getLogger(__name__)

HISTORY_LENGTH = 10
# The trigger id: also the top-up's purchase "session" id and its Stripe idempotency key.
KEY_PREFIX = "topup_"


class CardCharges(Protocol):
    """Stripe's off-session charges (stripe_cards.StripeCards) or the simulated card's."""

    def charge_off_session(
        self, request: OffSessionRequest, *, idempotency_key: str
    ) -> OffSessionPayment: ...

    def retrieve_payment(self, payment_intent_id: str) -> OffSessionPayment: ...


# --- what the pages show ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopUpLine:
    id: int
    created_at: datetime
    pack_id: str
    credits: int
    amount: str  # "5.00 USD"
    status: str
    failure: str
    payment_intent_id: str | None


@dataclass(frozen=True, slots=True)
class AutoTopUpView:
    enabled: bool
    threshold: int
    pack_id: str
    monthly_cap: int
    has_card: bool
    card_brand: str
    card_last4: str
    card_exp: str
    card_simulated: bool
    consecutive_failures: int
    notice_kind: str
    notice: str
    this_month: int
    simulate_next: str
    history: list[TopUpLine]


def form_threshold(settings: Settings, view: AutoTopUpView) -> int:
    """The threshold /credits shows: the one saved, or until one is, the suggestion for the
    pack the form shows (0 when there is no pack to suggest from)."""
    if view.threshold:
        return view.threshold
    pack = settings.pack(view.pack_id) or (settings.packs[0] if settings.packs else None)
    return suggested_threshold(pack.credits) if pack else 0


def view(
    db: Database, settings: Settings, *, user_id: int, now: datetime | None = None
) -> AutoTopUpView:
    """A user's auto top-up as /credits and the admin console show it."""
    now = now or utcnow()
    with db.read(snapshot=True) as conn:
        row = _settings_row(conn, user_id)
        this_month = _count_this_month(conn, user_id, now)
        history = _history(conn, user_id)
    if row is None:
        return AutoTopUpView(
            enabled=False,
            threshold=0,
            pack_id=settings.packs[0].id if settings.packs else "",
            monthly_cap=settings.auto_topup_monthly_cap,
            has_card=False,
            card_brand="",
            card_last4="",
            card_exp="",
            card_simulated=False,
            consecutive_failures=0,
            notice_kind="",
            notice="",
            this_month=this_month,
            simulate_next="",
            history=history,
        )
    shown = AutoTopUpView(
        enabled=row.enabled,
        threshold=row.threshold,
        pack_id=row.pack_id,
        monthly_cap=row.monthly_cap,
        has_card=row.payment_method_id is not None,
        card_brand=row.card_brand,
        card_last4=row.card_last4,
        card_exp=row.card_exp,
        card_simulated=row.card_simulated,
        consecutive_failures=row.consecutive_failures,
        notice_kind=row.notice_kind,
        notice=row.notice,
        this_month=this_month,
        simulate_next=row.simulate_next,
        history=history,
    )
    if _card_unusable(settings, row):
        # Shown as no card until a run of the job or a save forgets it.
        return replace(shown, has_card=False, **_SIMULATED_CARD_FORGOTTEN)
    return shown


def _history(conn: Connection, user_id: int) -> list[TopUpLine]:
    rows = conn.execute(
        sa.select(auto_topups)
        .where(auto_topups.c.user_id == user_id)
        .order_by(auto_topups.c.id.desc())
        .limit(HISTORY_LENGTH)
    ).all()
    return [
        TopUpLine(
            id=r.id,
            created_at=r.created_at,
            pack_id=r.pack_id,
            credits=r.credits,
            amount=format_money(r.amount, r.currency),
            status=r.status,
            failure=rules.failure_reason(r.failure_code) if r.failure_code else "",
            payment_intent_id=r.payment_intent_id,
        )
        for r in rows
    ]


# What forgetting a simulated card leaves, in the settings row and in the view alike.
_SIMULATED_CARD_FORGOTTEN: dict[str, Any] = {
    "enabled": False,
    "card_brand": "",
    "card_last4": "",
    "card_exp": "",
    "card_simulated": False,
    "simulate_next": "",
    "notice_kind": Notice.DISABLED,
    "notice": rules.SIMULATED_CARD_NOTICE,
}


def _card_unusable(settings: Settings, row: Any) -> bool:
    """A simulated card saved before a Stripe key was set: Stripe cannot charge it."""
    return (
        row.payment_method_id is not None
        and bool(row.card_simulated)
        and not simulated_checkout_enabled(settings)
    )


def _forget_simulated_cards(db: Database, now: datetime) -> None:
    """Once a Stripe key is set, the simulated cards a development database still has are
    forgotten (auto top-up off, with a notice on every page), whether or not a top-up is due.
    Read first: the job runs every 5 s, and after the first run there is nothing to write."""
    s = auto_topup_settings
    with db.read() as conn:
        found = conn.execute(
            sa.select(s.c.user_id)
            .where(s.c.card_simulated.is_(True), s.c.payment_method_id.is_not(None))
            .limit(1)
        ).first()
    if found is not None:
        with db.transaction() as conn:
            _forget_simulated_card(conn, None, now)


def _forget_simulated_card(conn: Connection, user_id: int | None, now: datetime) -> None:
    """Forget the user's simulated card (every user's, with None)."""
    s = auto_topup_settings
    conn.execute(
        sa.update(s)
        .where(
            s.c.card_simulated.is_(True),
            s.c.payment_method_id.is_not(None),
            *([] if user_id is None else [s.c.user_id == user_id]),
        )
        .values(
            payment_method_id=None,
            customer_id=None,
            updated_at=now,
            **_SIMULATED_CARD_FORGOTTEN,
        )
    )


def _settings_row(conn: Connection, user_id: int, *, lock: bool = False) -> Any:
    query = sa.select(auto_topup_settings).where(auto_topup_settings.c.user_id == user_id)
    return conn.execute(query.with_for_update() if lock else query).first()


def _count_this_month(conn: Connection, user_id: int, now: datetime) -> int:
    """Top-ups that charged, or may still: the monthly cap counts these."""
    return int(
        conn.execute(
            sa.select(sa.func.count())
            .select_from(auto_topups)
            .where(
                auto_topups.c.user_id == user_id,
                auto_topups.c.created_at >= rules.month_start(now),
                auto_topups.c.status.in_(("processing", "succeeded")),
            )
        ).scalar_one()
    )


def _ensure_row(db: Database, settings: Settings, user_id: int, now: datetime) -> None:
    with db.transaction() as conn:
        conn.execute(
            db.insert_ignoring_conflict(auto_topup_settings, index="user_id").values(
                user_id=user_id,
                enabled=False,
                threshold=0,
                pack_id=settings.packs[0].id if settings.packs else "",
                monthly_cap=settings.auto_topup_monthly_cap,
                card_brand="",
                card_last4="",
                card_exp="",
                card_simulated=False,
                consecutive_failures=0,
                notice_kind="",
                notice="",
                simulate_next="",
                updated_at=now,
            )
        )


# --- the user's choices -----------------------------------------------------------------------


def save_settings(
    db: Database,
    settings: Settings,
    *,
    user_id: int,
    enabled: bool,
    threshold: int,
    pack_id: str,
    monthly_cap: int,
    now: datetime | None = None,
) -> None:
    """ "When my available credits fall below `threshold`, buy `pack_id`" (at most
    `monthly_cap` times a month). Turning it on needs a saved card, and a pack with a plain
    price larger than the threshold, so that one top-up lifts the account above it."""
    now = now or utcnow()
    rules.check_settings(threshold=threshold, monthly_cap=monthly_cap)
    pack = settings.pack(pack_id)
    if pack is None:
        raise InvalidAutoTopUp(f"There is no credit pack called {pack_id[:40]!r}.")
    if pack.amount <= 0:
        raise InvalidAutoTopUp(
            f"The {label_of(pack)} pack is priced at checkout, so it cannot be bought "
            "automatically. Choose another pack."
        )
    if pack.credits <= threshold:
        raise InvalidAutoTopUp(
            f"The {label_of(pack)} pack ({pack.credits:,} credits) must be larger than the "
            "threshold, so that one top-up lifts your credits above it."
        )
    _ensure_row(db, settings, user_id, now)
    with db.transaction() as conn:
        row = _settings_row(conn, user_id, lock=True)
        if _card_unusable(settings, row):
            _forget_simulated_card(conn, user_id, now)
            row = _settings_row(conn, user_id)
        if enabled and row.payment_method_id is None:
            raise InvalidAutoTopUp("Save a card first: auto top-up pays with it.")
        values: dict[str, Any] = {
            "enabled": enabled,
            "threshold": threshold,
            "pack_id": pack.id,
            "monthly_cap": monthly_cap,
            "updated_at": now,
        }
        if enabled and not row.enabled:
            # Turned on again: a clean slate after the failures that turned it off.
            values.update(consecutive_failures=0, retry_after=None, notice_kind="", notice="")
        conn.execute(
            sa.update(auto_topup_settings)
            .where(auto_topup_settings.c.user_id == user_id)
            .values(**values)
        )


def turn_off(db: Database, *, user_id: int, now: datetime | None = None) -> None:
    with db.transaction() as conn:
        conn.execute(
            sa.update(auto_topup_settings)
            .where(auto_topup_settings.c.user_id == user_id)
            .values(enabled=False, updated_at=now or utcnow())
        )


def dismiss_notice(db: Database, *, user_id: int) -> None:
    with db.transaction() as conn:
        conn.execute(
            sa.update(auto_topup_settings)
            .where(auto_topup_settings.c.user_id == user_id)
            .values(notice_kind="", notice="")
        )


def set_simulated_outcome(
    db: Database, settings: Settings, *, user_id: int, outcome: str, now: datetime | None = None
) -> None:
    """Development only: what the simulated card's next charge does."""
    if not simulated_checkout_enabled(settings):
        raise PaymentsUnavailable("The simulated card exists only in development.")
    if outcome not in simulated_card.OUTCOMES:
        raise InvalidAutoTopUp(f"{outcome[:40]!r} is not a simulated outcome.")
    _ensure_row(db, settings, user_id, now or utcnow())
    with db.transaction() as conn:
        conn.execute(
            sa.update(auto_topup_settings)
            .where(auto_topup_settings.c.user_id == user_id)
            .values(simulate_next=outcome)
        )


# --- the saved card ---------------------------------------------------------------------------


def start_card_setup(
    db: Database, settings: Settings, *, user_id: int, now: datetime | None = None
) -> str:
    """Send the user to save a card: Stripe Checkout in `mode: setup` for their customer.
    In simulated mode a simulated card is saved at once. Returns where the browser goes."""
    now = now or utcnow()
    _ensure_row(db, settings, user_id, now)
    if settings.simulated_checkout:
        if not simulated_checkout_enabled(settings):
            raise PaymentsUnavailable("Saving a card is not available on this site yet.")
        _save_card(
            db, user_id, simulated_card.simulated_card(user_id, now), simulated=True, now=now
        )
        return "/credits?card=saved"
    # Imported here: checkout reaches the webhook, which reaches this module.
    from aicredits.services.checkout import ensure_stripe_customer

    customer_id = ensure_stripe_customer(db, settings, user_id=user_id, now=now)
    currency = (settings.packs[0].currency if settings.packs else "usd").lower()
    try:
        created = stripe_cards(
            settings.stripe_secret_key, settings.stripe_api_base
        ).create_setup_session(
            customer_id=customer_id,
            currency=currency,
            success_url=f"{settings.public_url}/credits?card_session={{CHECKOUT_SESSION_ID}}",
            cancel_url=f"{settings.public_url}/credits",
            idempotency_key=f"aicredits-card-setup-{user_id}-{uuid.uuid4().hex}",
        )
    except StripeFailure as exc:
        raise CheckoutFailed(f"Stripe could not start saving a card ({exc}).") from exc
    with db.transaction() as conn:
        conn.execute(
            sa.update(auto_topup_settings)
            .where(auto_topup_settings.c.user_id == user_id)
            .values(setup_session_id=created.id, customer_id=customer_id, updated_at=now)
        )
    return created.url


def record_card_setup(
    db: Database, settings: Settings, *, session_object: dict[str, Any], now: datetime | None = None
) -> str:
    """A setup-mode Checkout Session completed (the webhook): save its card, if it is a
    session we made (the user's row names it). Returns the outcome's name."""
    session = parse_setup_session(session_object)
    return _finish_card_setup(db, settings, session_id=session.id, user_id=None, now=now)


def confirm_card_setup(
    db: Database, settings: Settings, *, user_id: int, session_id: str, now: datetime | None = None
) -> bool:
    """Stripe sent the browser back from saving a card: read the session back and save the
    card (the same function as the webhook). True if a card is saved now."""
    try:
        outcome = _finish_card_setup(db, settings, session_id=session_id, user_id=user_id, now=now)
    except StripeFailure as exc:
        raise CheckoutFailed(f"Stripe could not be asked about the card ({exc}).") from exc
    return outcome in ("card_saved", "card_already_saved")


def _finish_card_setup(
    db: Database, settings: Settings, *, session_id: str, user_id: int | None, now: datetime | None
) -> str:
    now = now or utcnow()
    with db.read() as conn:
        row = conn.execute(
            sa.select(auto_topup_settings).where(
                auto_topup_settings.c.setup_session_id == session_id
            )
        ).first()
    if row is None or (user_id is not None and row.user_id != user_id):
        return "unknown_setup_session"
    api = stripe_cards(settings.stripe_secret_key, settings.stripe_api_base)
    session = api.retrieve_setup_session(session_id)
    if session.status != "complete" or not session.setup_intent_id:
        return "setup_not_complete"
    card = api.retrieve_setup_card(session.setup_intent_id)
    if row.customer_id and card.customer_id and card.customer_id != row.customer_id:
        logger.warning("setup session %s saved a card of another customer", session_id)
        return "customer_mismatch"
    if row.payment_method_id == card.payment_method_id:
        return "card_already_saved"
    _save_card(db, row.user_id, card, simulated=False, now=now)
    return "card_saved"


def _save_card(
    db: Database, user_id: int, card: SavedCard, *, simulated: bool, now: datetime
) -> None:
    with db.transaction() as conn:
        conn.execute(
            sa.update(auto_topup_settings)
            .where(auto_topup_settings.c.user_id == user_id)
            .values(
                payment_method_id=card.payment_method_id,
                customer_id=card.customer_id,
                card_brand=card.brand,
                card_last4=card.last4,
                card_exp=card.exp,
                card_simulated=simulated,
                setup_session_id=None,
                updated_at=now,
            )
        )


def remove_card(
    db: Database, settings: Settings, *, user_id: int, now: datetime | None = None
) -> None:
    """Forget the card (and detach it from the Stripe customer); auto top-up turns off."""
    now = now or utcnow()
    with db.read() as conn:
        row = _settings_row(conn, user_id)
    if row is None or row.payment_method_id is None:
        return
    if not row.card_simulated and not settings.simulated_checkout:
        try:
            stripe_cards(settings.stripe_secret_key, settings.stripe_api_base).detach_card(
                row.payment_method_id
            )
        except StripeFailure as exc:
            raise CheckoutFailed(f"Stripe could not remove the card ({exc}).") from exc
    with db.transaction() as conn:
        conn.execute(
            sa.update(auto_topup_settings)
            .where(auto_topup_settings.c.user_id == user_id)
            .values(
                enabled=False,
                payment_method_id=None,
                card_brand="",
                card_last4="",
                card_exp="",
                card_simulated=False,
                updated_at=now,
            )
        )


# --- the job ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Started:
    id: int
    user_id: int
    key: str
    pack_label: str
    credits: int
    amount: int
    currency: str
    customer_id: str
    payment_method_id: str
    simulate_next: str
    simulated: bool


def run_due(db: Database, settings: Settings, *, now: datetime | None = None) -> int:
    """One run of the job: finish the top-ups left in flight, then start one for each account
    below its threshold. Returns how many top-ups it started. Run under the job lock."""
    now = now or utcnow()
    for topup_id in _in_flight(db):
        _resume(db, settings, topup_id, now)
    if settings.environment == "dev" and not settings.simulated_checkout:
        # Development with a Stripe key, where a database may still hold simulated cards.
        # (Production never saves one; any that came with a database go when due: _start.)
        _forget_simulated_cards(db, now)
    started = 0
    for user_id in _below_threshold(db, now):
        topup = _start(db, settings, user_id, now)
        if topup is not None:
            started += 1
            _charge(db, settings, topup, now)
    return started


def _in_flight(db: Database) -> list[int]:
    with db.read() as conn:
        return list(
            conn.execute(
                sa.select(auto_topups.c.id)
                .where(auto_topups.c.status == "processing")
                .order_by(auto_topups.c.id)
            ).scalars()
        )


def _below_threshold(db: Database, now: datetime) -> list[int]:
    s, a = auto_topup_settings, credit_accounts
    with db.read() as conn:
        return list(
            conn.execute(
                sa.select(s.c.user_id)
                .join(a, a.c.user_id == s.c.user_id)
                .where(
                    s.c.enabled.is_(True),
                    s.c.payment_method_id.is_not(None),
                    a.c.balance - a.c.held < s.c.threshold,
                    sa.or_(s.c.retry_after.is_(None), s.c.retry_after <= now),
                )
                .order_by(s.c.user_id)
            ).scalars()
        )


def _start(db: Database, settings: Settings, user_id: int, now: datetime) -> _Started | None:
    """Start a top-up, in one transaction under the settings row's lock: check again that it
    is due, that none is in flight and that the month's cap allows it, then insert the top-up
    and the purchase it will be credited through. None when no top-up starts."""
    with db.transaction() as conn:
        row = _settings_row(conn, user_id, lock=True)
        account = conn.execute(
            sa.select(credit_accounts.c.balance, credit_accounts.c.held).where(
                credit_accounts.c.user_id == user_id
            )
        ).first()
        if row is None or account is None:
            return None
        if _card_unusable(settings, row):
            _forget_simulated_card(conn, user_id, now)
            return None
        if not row.card_simulated and settings.simulated_checkout:
            # A card saved through Stripe, and no Stripe key now: it cannot be charged, and a
            # top-up started now would be charged whenever a key came back. Kept for then.
            return None
        due = rules.is_due(
            enabled=row.enabled,
            has_card=row.payment_method_id is not None,
            available=account.balance - account.held,
            threshold=row.threshold,
            retry_after=row.retry_after,
            now=now,
        )
        if not due.due:
            return None
        in_flight = conn.execute(
            sa.select(auto_topups.c.id).where(
                auto_topups.c.user_id == user_id, auto_topups.c.status == "processing"
            )
        ).first()
        if in_flight is not None:
            return None
        if rules.cap_reached(
            this_month=_count_this_month(conn, user_id, now), monthly_cap=row.monthly_cap
        ):
            if row.notice_kind != Notice.CAP_REACHED:
                conn.execute(
                    sa.update(auto_topup_settings)
                    .where(auto_topup_settings.c.user_id == user_id)
                    .values(
                        notice_kind=Notice.CAP_REACHED, notice=rules.cap_notice(row.monthly_cap)
                    )
                )
            return None
        pack = settings.pack(row.pack_id)
        if pack is None or pack.amount <= 0:
            _turn_off_for(
                conn,
                user_id,
                f"Auto top-up is off: the {row.pack_id} pack is no longer sold. Choose another.",
                now,
            )
            return None
        customer_id = row.customer_id or _customer_of(conn, user_id)
        if not customer_id:
            _turn_off_for(conn, user_id, "Auto top-up is off: save your card again.", now)
            return None
        return _insert_topup(conn, db, settings, row, pack, customer_id, now)


def _insert_topup(
    conn: Connection,
    db: Database,
    settings: Settings,
    row: Any,
    pack: CreditPack,
    customer_id: str,
    now: datetime,
) -> _Started:
    key = KEY_PREFIX + secrets.token_hex(16)
    simulated = bool(row.card_simulated)
    purchase_id = conn.execute(
        sa.insert(purchases)
        .values(
            user_id=row.user_id,
            pack_id=pack.id,
            credits=pack.credits,
            amount=pack.amount,
            currency=pack.currency.lower(),
            checkout_session_id=key,
            customer_id=customer_id,
            status="open",
            simulated=simulated,
            flagged=False,
            created_at=now,
            updated_at=now,
        )
        .returning(purchases.c.id)
    ).scalar_one()
    topup_id = conn.execute(
        sa.insert(auto_topups)
        .values(
            user_id=row.user_id,
            key=key,
            purchase_id=purchase_id,
            pack_id=pack.id,
            credits=pack.credits,
            amount=pack.amount,
            currency=pack.currency.lower(),
            status="processing",
            failure_code="",
            failure_message="",
            simulated=simulated,
            created_at=now,
            updated_at=now,
            email_attempts=0,
            email_error="",
        )
        .returning(auto_topups.c.id)
    ).scalar_one()
    return _Started(
        id=topup_id,
        user_id=row.user_id,
        key=key,
        pack_label=label_of(pack),
        credits=pack.credits,
        amount=pack.amount,
        currency=pack.currency.lower(),
        customer_id=customer_id,
        payment_method_id=row.payment_method_id,
        simulate_next=row.simulate_next,
        simulated=simulated,
    )


def _customer_of(conn: Connection, user_id: int) -> str | None:
    return conn.execute(
        sa.select(stripe_customers.c.customer_id).where(stripe_customers.c.user_id == user_id)
    ).scalar()


def _turn_off_for(conn: Connection, user_id: int, notice: str, now: datetime) -> None:
    conn.execute(
        sa.update(auto_topup_settings)
        .where(auto_topup_settings.c.user_id == user_id)
        .values(enabled=False, notice_kind=Notice.DISABLED, notice=notice[:500], updated_at=now)
    )


def _charges(settings: Settings, topup: _Started) -> CardCharges:
    if topup.simulated:
        if not simulated_checkout_enabled(settings):
            raise PaymentsUnavailable("A simulated card cannot be charged outside development.")
        return simulated_card.SimulatedCards(topup.simulate_next)
    return stripe_cards(settings.stripe_secret_key, settings.stripe_api_base)


def _charge(db: Database, settings: Settings, topup: _Started, now: datetime) -> None:
    """Charge the saved card for a started top-up and record the answer. With no answer
    (Stripe unreachable), the top-up stays in flight and the next run asks again with the
    same idempotency key."""
    request = OffSessionRequest(
        customer_id=topup.customer_id,
        payment_method_id=topup.payment_method_id,
        amount=topup.amount,
        currency=topup.currency,
        description=f"Auto top-up: {topup.pack_label}, {topup.credits:,} credits",
        metadata={"user_id": str(topup.user_id), "auto_topup": topup.key},
    )
    try:
        payment = _charges(settings, topup).charge_off_session(
            request, idempotency_key=f"aicredits-{topup.key}"
        )
    except (StripeFailure, PaymentsUnavailable) as exc:
        logger.warning("auto top-up %s: no answer from Stripe yet (%s)", topup.id, exc)
        return
    record_payment(db, settings, payment, topup_id=topup.id, now=now)


# The top-ups (by key) this process has said it cannot finish without a Stripe key.
_WAITING_FOR_KEY: set[str] = set()


def _resume(db: Database, settings: Settings, topup_id: int, now: datetime) -> None:
    """A top-up left in flight: read its payment back, or, if it never got one, charge
    again with the same key (Stripe answers a key it has seen with its first answer)."""
    with db.read() as conn:
        row = conn.execute(sa.select(auto_topups).where(auto_topups.c.id == topup_id)).first()
        if row is None or row.status != "processing":
            return
        card = _settings_row(conn, row.user_id)
    if not row.simulated and not settings.stripe_secret_key:
        # Started through Stripe, and the key removed since (development). Stripe may have
        # charged it, so it stays in flight until the key is back: said once per process,
        # not at every run of the job.
        if row.key not in _WAITING_FOR_KEY:
            _WAITING_FOR_KEY.add(row.key)
            logger.warning(
                "auto top-up %s: started through Stripe and STRIPE_SECRET_KEY is not set; "
                "it is finished once the key is back",
                topup_id,
            )
        return
    if row.payment_intent_id and not row.simulated:
        try:
            payment = stripe_cards(
                settings.stripe_secret_key, settings.stripe_api_base
            ).retrieve_payment(row.payment_intent_id)
        except StripeFailure as exc:
            logger.warning("auto top-up %s: could not read its payment back (%s)", topup_id, exc)
            return
        record_payment(db, settings, payment, topup_id=topup_id, now=now)
        return
    if card is None or card.payment_method_id is None:
        _record_failure(
            db, settings, topup_id, code="card_removed", message="The card was removed.", now=now
        )
        return
    if row.simulated and not simulated_checkout_enabled(settings):
        # Left in flight on a simulated card, and a Stripe key set since: nothing was charged
        # (a simulated charge is answered at once), and Stripe cannot charge that card.
        _record_failure(
            db,
            settings,
            topup_id,
            code=rules.SIMULATED_CARD,
            message="A simulated card cannot be charged through Stripe.",
            now=now,
        )
        with db.transaction() as conn:
            if _card_unusable(settings, _settings_row(conn, row.user_id, lock=True)):
                _forget_simulated_card(conn, row.user_id, now)
        return
    started = _Started(
        id=row.id,
        user_id=row.user_id,
        key=row.key,
        pack_label=row.pack_id,
        credits=row.credits,
        amount=row.amount,
        currency=row.currency,
        customer_id=card.customer_id or "",
        payment_method_id=card.payment_method_id,
        simulate_next=card.simulate_next,
        simulated=row.simulated,
    )
    _charge(db, settings, started, now)


# --- recording what Stripe said -------------------------------------------------------------


def record_payment(
    db: Database,
    settings: Settings,
    payment: OffSessionPayment,
    *,
    topup_id: int | None = None,
    now: datetime | None = None,
) -> str:
    """What Stripe said about a top-up's PaymentIntent (the job's answer or read-back, or a
    verified event), recorded once. Returns the outcome's name. A PaymentIntent we have no
    top-up for credits nothing."""
    now = now or utcnow()
    with db.transaction() as conn:
        if topup_id is not None:
            row = conn.execute(
                sa.select(auto_topups).where(auto_topups.c.id == topup_id).with_for_update()
            ).first()
            if row is not None and row.payment_intent_id not in (None, payment.id):
                row = None
        else:
            row = conn.execute(
                sa.select(auto_topups)
                .where(auto_topups.c.payment_intent_id == payment.id)
                .with_for_update()
            ).first()
        if row is None:
            return "unknown_payment_intent"
        if row.payment_intent_id is None:
            conn.execute(
                sa.update(auto_topups)
                .where(auto_topups.c.id == row.id)
                .values(payment_intent_id=payment.id, updated_at=now)
            )
            conn.execute(
                sa.update(purchases)
                .where(purchases.c.id == row.purchase_id, purchases.c.payment_intent_id.is_(None))
                .values(payment_intent_id=payment.id, updated_at=now)
            )
    if payment.outcome == PROCESSING:
        return "processing"
    if payment.outcome == SUCCEEDED:
        if payment.amount != row.amount or payment.currency != row.currency:
            logger.error(
                "auto top-up %s: payment %s is for %s %s, not the %s %s we asked; not credited",
                row.id,
                payment.id,
                payment.amount,
                payment.currency,
                row.amount,
                row.currency,
            )
            return "amount_mismatch"
        return _fulfil(db, settings, row.id, payment, now)
    code = payment.failure_code or (
        "authentication_required" if payment.outcome == REQUIRES_ACTION else "card_declined"
    )
    return _record_failure(
        db,
        settings,
        row.id,
        code=code,
        message=payment.failure_message,
        requires_action=payment.outcome == REQUIRES_ACTION,
        now=now,
    )


def _fulfil(
    db: Database, settings: Settings, topup_id: int, payment: OffSessionPayment, now: datetime
) -> str:
    """Credit a paid top-up through the same function as a Checkout purchase: once, by the
    purchase's ledger key, whichever of the job and the webhook gets here first."""
    with db.transaction() as conn:
        row = conn.execute(
            sa.select(auto_topups).where(auto_topups.c.id == topup_id).with_for_update()
        ).one()
        known = {"charge_id": payment.charge_id, "receipt_url": payment.receipt_url}
        values = {k: sa.func.coalesce(purchases.c[k], v) for k, v in known.items() if v}
        if values:
            conn.execute(
                sa.update(purchases).where(purchases.c.id == row.purchase_id).values(**values)
            )
        newly = fulfilment.credit_paid_purchase(conn, row.purchase_id, now)
        if row.status != "succeeded":
            conn.execute(
                sa.update(auto_topups)
                .where(auto_topups.c.id == topup_id)
                .values(status="succeeded", finished_at=now, updated_at=now, next_email_at=None)
            )
            conn.execute(
                sa.update(auto_topup_settings)
                .where(auto_topup_settings.c.user_id == row.user_id)
                .values(consecutive_failures=0, retry_after=None, notice_kind="", notice="")
            )
    if newly:
        thresholds.record_crossings(db, settings, user_id=row.user_id, now=now)
        logger.info("auto top-up %s credited %s credits", topup_id, row.credits)
    return "credited" if newly else "already_credited"


def _record_failure(
    db: Database,
    settings: Settings,
    topup_id: int,
    *,
    code: str,
    message: str,
    requires_action: bool = False,
    now: datetime,
) -> str:
    """A top-up that did not charge: counted once (only the move out of `processing`
    counts), its email queued, the next try put off, auto top-up turned off after too many."""
    status = "requires_action" if requires_action else "failed"
    with db.transaction() as conn:
        changed = conn.execute(
            sa.update(auto_topups)
            .where(auto_topups.c.id == topup_id, auto_topups.c.status == "processing")
            .values(
                status=status,
                failure_code=code[:64],
                failure_message=message[:500],
                finished_at=now,
                updated_at=now,
                next_email_at=now,
            )
        ).rowcount
        if not changed:
            return "already_recorded"
        row = conn.execute(sa.select(auto_topups).where(auto_topups.c.id == topup_id)).one()
        conn.execute(
            sa.update(purchases)
            .where(purchases.c.id == row.purchase_id, purchases.c.fulfilled_at.is_(None))
            .values(status="failed", updated_at=now)
        )
        card = _settings_row(conn, row.user_id, lock=True)
        failures = card.consecutive_failures + 1
        disabled = rules.turns_off(
            failures_in_a_row=failures, max_failures=settings.auto_topup_max_failures
        )
        pack = settings.pack(row.pack_id)
        kind = (
            Notice.DISABLED
            if disabled
            else Notice.ACTION_REQUIRED
            if requires_action
            else Notice.FAILED
        )
        conn.execute(
            sa.update(auto_topup_settings)
            .where(auto_topup_settings.c.user_id == row.user_id)
            .values(
                consecutive_failures=failures,
                retry_after=now + timedelta(minutes=settings.auto_topup_retry_minutes),
                enabled=card.enabled and not disabled,
                notice_kind=kind,
                notice=rules.failure_notice(
                    code=code,
                    failures_in_a_row=failures,
                    disabled=disabled,
                    pack=label_of(pack) if pack else row.pack_id,
                )[:500],
                simulate_next="",
                updated_at=now,
            )
        )
    logger.info("auto top-up %s failed: %s%s", topup_id, code, " (turned off)" if disabled else "")
    return "turned_off" if disabled else status


# --- the webhook ------------------------------------------------------------------------------


def handle_payment_intent_event(
    db: Database, settings: Settings, *, event_type: str, obj: dict[str, Any], now: datetime
) -> str:
    """`payment_intent.succeeded` / `payment_intent.payment_failed`, already verified: applied
    to the top-up whose PaymentIntent it is. Any other PaymentIntent (a Checkout purchase's,
    or one not made here) is left alone."""
    payment = parse_payment_intent(obj)
    if event_type == "payment_intent.succeeded" and payment.outcome != SUCCEEDED:
        return "ignored"
    if event_type == "payment_intent.payment_failed" and payment.outcome not in (
        FAILED,
        REQUIRES_ACTION,
    ):
        return "ignored"
    return record_payment(db, settings, payment, now=now)


# --- emails -----------------------------------------------------------------------------------


def send_due_emails(db: Database, settings: Settings, *, now: datetime | None = None) -> int:
    """The emails about failed top-ups (one per failure), when SMTP is configured."""
    if not settings.smtp_configured:
        return 0
    details = (
        sa.select(
            users.c.email,
            users.c.name,
            auto_topups.c.pack_id,
            auto_topups.c.failure_code,
            auto_topup_settings.c.enabled,
            auto_topup_settings.c.consecutive_failures,
        )
        .select_from(auto_topups)
        .join(users, users.c.id == auto_topups.c.user_id)
        .join(auto_topup_settings, auto_topup_settings.c.user_id == auto_topups.c.user_id)
    )

    def compose(row: sa.Row[Any]) -> outbox.Email | None:
        if not row.email:
            return None
        pack = settings.pack(row.pack_id)
        notice = rules.failure_notice(
            code=row.failure_code,
            failures_in_a_row=row.consecutive_failures,
            disabled=not row.enabled,
            pack=label_of(pack) if pack else row.pack_id,
        )
        return outbox.Email(
            to=row.email,
            subject="Your automatic top-up did not go through",
            body=(
                f"Hello {row.name or 'there'},\n\n{notice}\n\n"
                f"Your credits and auto top-up settings: {settings.public_url}/credits\n"
            ),
        )

    return outbox.send_due(
        db,
        settings,
        table=auto_topups,
        details=details,
        compose=compose,
        label="auto top-up",
        now=now,
    )
