"""The simulated saved card: with no STRIPE_SECRET_KEY, and only in development, auto top-up
runs against a card that exists only here, and its off-session charges are answered locally
in the shape Stripe answers them. No money moves.

The dev-only switch on /credits ("next simulated charge") makes the next charge be declined,
find an expired card, or need the customer to authenticate, so every path of auto top-up can
be seen locally. The answer depends only on the top-up's key and that switch, which the
service clears in the same transaction that records the answer, so a retry of the same
top-up gets the same answer, as an idempotent Stripe request would.
"""

from __future__ import annotations

from datetime import datetime

from aicredits.adapters.stripe_cards import (
    FAILED,
    REQUIRES_ACTION,
    SUCCEEDED,
    OffSessionPayment,
    OffSessionRequest,
    SavedCard,
)
from aicredits.services.stripe_config import simulated_customer_id

PAYMENT_METHOD_PREFIX = "pm_sim_"
PAYMENT_INTENT_PREFIX = "pi_sim_topup_"

# What the switch offers: value -> (outcome, Stripe's code, Stripe's message).
OUTCOMES: dict[str, tuple[str, str, str]] = {
    "": (SUCCEEDED, "", ""),
    "decline": (FAILED, "card_declined", "Your card was declined."),
    "expired_card": (FAILED, "expired_card", "Your card has expired."),
    "authentication_required": (
        REQUIRES_ACTION,
        "authentication_required",
        "Your card was declined. This transaction requires authentication.",
    ),
}


def simulated_card(user_id: int, now: datetime) -> SavedCard:
    return SavedCard(
        payment_method_id=f"{PAYMENT_METHOD_PREFIX}{user_id}",
        customer_id=simulated_customer_id(user_id),
        brand="visa",
        last4="4242",
        exp=f"12/{now.year + 3}",
    )


class SimulatedCards:
    """Stands in for stripe_cards.StripeCards' charges."""

    def __init__(self, next_outcome: str = "") -> None:
        self._next = next_outcome if next_outcome in OUTCOMES else ""

    def charge_off_session(
        self, request: OffSessionRequest, *, idempotency_key: str
    ) -> OffSessionPayment:
        outcome, code, message = OUTCOMES[self._next]
        return OffSessionPayment(
            id=payment_intent_of(idempotency_key),
            outcome=outcome,
            amount=request.amount,
            currency=request.currency,
            customer_id=request.customer_id,
            charge_id=None if outcome != SUCCEEDED else "ch_sim_" + idempotency_key[-24:],
            failure_code=code,
            failure_message=message,
        )

    def retrieve_payment(self, payment_intent_id: str) -> OffSessionPayment:
        raise LookupError(f"{payment_intent_id}: simulated payments are never left processing")


def payment_intent_of(idempotency_key: str) -> str:
    return PAYMENT_INTENT_PREFIX + idempotency_key[-32:]
