"""Why a purchase cannot go ahead: the errors the payment services raise. Each carries a
message that is safe to show; the edge (api/stripe_routes.py, the credits State) decides
how to answer it."""

from __future__ import annotations

from aicredits.domain.errors import AICreditsError


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
