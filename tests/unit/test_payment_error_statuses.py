"""The payment routes answer each service error with one status, chosen at the edge."""

from __future__ import annotations

import pytest

from aicredits.api.small_pages import error_status
from aicredits.domain.errors import AICreditsError
from aicredits.services.payment_errors import (
    CheckoutFailed,
    PaymentError,
    PaymentsUnavailable,
    UnknownCheckoutSession,
    UnknownPack,
)
from aicredits.services.stripe_webhook import InvalidSignature, MalformedEvent


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidSignature("bad signature"), 400),
        (MalformedEvent("not an event"), 400),
        (PaymentError("This checkout was cancelled."), 400),
        (UnknownPack("There is no credit pack called 'gold'."), 400),
        (UnknownCheckoutSession("There is no such checkout."), 404),
        (CheckoutFailed("Stripe could not start the checkout."), 502),
        (PaymentsUnavailable("Buying credits is not available on this site yet."), 503),
    ],
)
def test_each_payment_error_has_its_status(error: AICreditsError, status: int) -> None:
    assert error_status(error) == status


def test_an_error_the_table_does_not_name_takes_its_base_classs_status() -> None:
    class StripeTimedOut(CheckoutFailed):
        pass

    assert error_status(StripeTimedOut("Stripe took too long.")) == 502
