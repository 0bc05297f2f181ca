"""How the app and Stripe find each other: the API client, the webhook's address and secret,
the pages Stripe sends the browser back to, and what a Checkout Session id looks like.

With no STRIPE_SECRET_KEY in development, the simulated checkout (aicredits.devtools) stands
in for Stripe's page and signs its events with a secret made on first use."""

from __future__ import annotations

import re

from aicredits.adapters import stripe_api
from aicredits.adapters.local_secret import LOCAL_DATA_DIR
from aicredits.settings import Settings

WEBHOOK_PATH = "/api/stripe/webhook"
DEV_WEBHOOK_SECRET_PATH = LOCAL_DATA_DIR / "dev_webhook_secret"
# The Checkout Session ids the simulated checkout makes.
SIMULATED_PREFIX = "cs_test_sim_"
# The customer ids the simulated payments make. Stripe never made them, so once a Stripe key is
# set they are nobody's there, though a database first used in simulated mode still has them.
SIMULATED_CUSTOMER_PREFIX = "cus_sim_"
_SESSION_ID = re.compile(r"^cs_[A-Za-z0-9_]{1,150}$")


def is_session_id(value: str) -> bool:
    """Whether `value` has the shape of a Checkout Session id (so it is safe in a URL)."""
    return bool(_SESSION_ID.match(value or ""))


def simulated_customer_id(user_id: int) -> str:
    return f"{SIMULATED_CUSTOMER_PREFIX}{user_id}"


def is_simulated_customer(customer_id: str) -> bool:
    return customer_id.startswith(SIMULATED_CUSTOMER_PREFIX)


def simulated_checkout_enabled(settings: Settings) -> bool:
    """The simulated checkout gives credits for nothing, so it never runs in production."""
    return settings.simulated_checkout and settings.environment == "dev"


def webhook_secret(settings: Settings) -> str | None:
    if settings.stripe_webhook_secret:
        return settings.stripe_webhook_secret
    if simulated_checkout_enabled(settings):
        return stripe_api.load_or_create_dev_secret(DEV_WEBHOOK_SECRET_PATH)
    return None


def stripe_client(settings: Settings) -> stripe_api.StripeApi:
    return stripe_api.stripe_api(settings.stripe_secret_key, settings.stripe_api_base)


def success_url(settings: Settings, session_id: str) -> str:
    return f"{settings.public_url}/credits/success?session_id={session_id}"


def cancel_url(settings: Settings) -> str:
    return f"{settings.public_url}/credits/cancel"


def webhook_url(settings: Settings) -> str:
    return settings.api_url + WEBHOOK_PATH
