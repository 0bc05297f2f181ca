"""Stripe's saved cards and off-session payments, for auto top-up.

* Saving a card: a Checkout Session in `mode: setup` for the user's customer, and reading
  back the card its SetupIntent saved (brand, last four, expiry: nothing more is kept).
* Charging it: an off-session PaymentIntent (`confirm=true`, `off_session=true`) with an
  idempotency key, so a retry of the same top-up gets Stripe's first answer, never a
  second charge. A decline or a card that needs authentication is an answer, not an error.
* Reading a PaymentIntent back, and the `payment_intent.*` events' objects.

Kept apart from stripe_api (Checkout for packs) so either can change without the other;
the rest of the app sees plain dataclasses, never SDK objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import stripe
from stripe._base_address import BaseAddresses

from aicredits.adapters.stripe_api import (
    CONNECT_TIMEOUT_SECONDS,
    MAX_NETWORK_RETRIES,
    READ_TIMEOUT_SECONDS,
    CreatedSession,
    MalformedEvent,
    StripeFailure,
    explain_error,
    read_int,
    read_str,
    read_url,
)

# What a PaymentIntent's status means for a top-up.
SUCCEEDED = "succeeded"
PROCESSING = "processing"
REQUIRES_ACTION = "requires_action"
FAILED = "failed"

# Stripe's codes for "the customer must authenticate this payment".
_AUTHENTICATION_CODES = frozenset({"authentication_required"})


@dataclass(frozen=True, slots=True)
class SavedCard:
    payment_method_id: str
    customer_id: str | None
    brand: str
    last4: str
    exp: str  # "MM/YYYY"


@dataclass(frozen=True, slots=True)
class OffSessionPayment:
    """A PaymentIntent as a top-up sees it: its id, what it asked for, and how it ended."""

    id: str
    outcome: str  # succeeded | processing | requires_action | failed
    amount: int
    currency: str
    customer_id: str | None = None
    charge_id: str | None = None
    receipt_url: str | None = None
    failure_code: str = ""
    failure_message: str = ""


@dataclass(frozen=True, slots=True)
class OffSessionRequest:
    customer_id: str
    payment_method_id: str
    amount: int
    currency: str
    description: str
    # Ours, for Stripe's dashboard; never read back as a source of money.
    metadata: dict[str, str]


def parse_payment_intent(obj: Mapping[str, Any]) -> OffSessionPayment:
    status = read_str(obj, "status") or ""
    error = obj.get("last_payment_error")
    code = message = ""
    if isinstance(error, Mapping):
        code = str(error.get("decline_code") or error.get("code") or "")[:64]
        message = str(error.get("message") or "")[:500]
    if status == "succeeded":
        outcome = SUCCEEDED
    elif status == "processing":
        outcome = PROCESSING
    elif status == "requires_action" or code in _AUTHENTICATION_CODES:
        outcome = REQUIRES_ACTION
    else:  # requires_payment_method after a decline, canceled, ...
        outcome = FAILED
    charge_id = receipt_url = None
    latest = obj.get("latest_charge")
    if isinstance(latest, Mapping):
        charge_id = read_str(latest, "id")
        receipt_url = read_url(latest.get("receipt_url"))
    elif isinstance(latest, str):
        charge_id = latest
    return OffSessionPayment(
        id=read_str(obj, "id", required=True) or "",
        outcome=outcome,
        amount=read_int(obj, "amount") or 0,
        currency=(read_str(obj, "currency") or "").lower(),
        customer_id=read_str(obj, "customer"),
        charge_id=charge_id,
        receipt_url=receipt_url,
        failure_code=code,
        failure_message=message,
    )


def parse_setup_card(obj: Mapping[str, Any]) -> SavedCard:
    """The card of a SetupIntent retrieved with expand=payment_method."""
    method = obj.get("payment_method")
    if not isinstance(method, Mapping):
        raise MalformedEvent("the setup intent has no payment method")
    card = method.get("card")
    if not isinstance(card, Mapping):
        raise MalformedEvent("the payment method is not a card")
    month, year = card.get("exp_month"), card.get("exp_year")
    return SavedCard(
        payment_method_id=read_str(method, "id", required=True) or "",
        customer_id=read_str(obj, "customer") or read_str(method, "customer"),
        brand=str(card.get("brand") or "card")[:20],
        last4=str(card.get("last4") or "")[:4],
        exp=f"{int(month):02d}/{int(year)}"
        if isinstance(month, int) and isinstance(year, int)
        else "",
    )


@dataclass(frozen=True, slots=True)
class SetupSession:
    id: str
    status: str | None
    customer_id: str | None
    setup_intent_id: str | None


def parse_setup_session(obj: Mapping[str, Any]) -> SetupSession:
    return SetupSession(
        id=read_str(obj, "id", required=True) or "",
        status=read_str(obj, "status"),
        customer_id=read_str(obj, "customer"),
        setup_intent_id=read_str(obj, "setup_intent"),
    )


class StripeCards:
    def __init__(self, secret_key: str, api_base: str = "") -> None:
        bases: BaseAddresses = {}
        if api_base:
            bases["api"] = api_base.rstrip("/")
        self._client = stripe.StripeClient(
            secret_key,
            base_addresses=bases,
            max_network_retries=MAX_NETWORK_RETRIES,
            http_client=stripe.RequestsClient(
                timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)
            ),
        )

    def create_setup_session(
        self,
        *,
        customer_id: str,
        currency: str,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
    ) -> CreatedSession:
        params: dict[str, Any] = {
            "mode": "setup",
            "customer": customer_id,
            "currency": currency,
            "payment_method_types": ["card"],
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
        try:
            session = self._client.v1.checkout.sessions.create(
                params,  # type: ignore[arg-type]
                {"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc
        url = read_url(session.url)
        if not url:
            raise StripeFailure("Stripe returned a setup session without a URL")
        return CreatedSession(id=str(session.id), url=url, amount_total=None, currency=currency)

    def retrieve_setup_session(self, session_id: str) -> SetupSession:
        try:
            session = self._client.v1.checkout.sessions.retrieve(session_id)
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc
        return parse_setup_session(session.to_dict())

    def retrieve_setup_card(self, setup_intent_id: str) -> SavedCard:
        try:
            intent = self._client.v1.setup_intents.retrieve(
                setup_intent_id, {"expand": ["payment_method"]}
            )
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc
        try:
            return parse_setup_card(intent.to_dict())
        except MalformedEvent as exc:
            raise StripeFailure(f"Stripe returned an unreadable setup intent: {exc}") from exc

    def detach_card(self, payment_method_id: str) -> None:
        try:
            self._client.v1.payment_methods.detach(payment_method_id)
        except stripe.InvalidRequestError:
            return  # already detached, or gone: either way it is no longer saved
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc

    def charge_off_session(
        self, request: OffSessionRequest, *, idempotency_key: str
    ) -> OffSessionPayment:
        """Create and confirm an off-session PaymentIntent. A decline or a card that needs
        authentication comes back as that outcome; only a failure to get an answer raises
        StripeFailure (retry with the same key)."""
        params: dict[str, Any] = {
            "amount": request.amount,
            "currency": request.currency,
            "customer": request.customer_id,
            "payment_method": request.payment_method_id,
            "confirm": True,
            "off_session": True,
            "description": request.description,
            "metadata": request.metadata,
            "expand": ["latest_charge"],
        }
        try:
            intent = self._client.v1.payment_intents.create(
                params,  # type: ignore[arg-type]
                {"idempotency_key": idempotency_key},
            )
        except stripe.CardError as exc:
            return _declined(exc)
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc
        return _parse_sdk_intent(intent.to_dict())

    def retrieve_payment(self, payment_intent_id: str) -> OffSessionPayment:
        try:
            intent = self._client.v1.payment_intents.retrieve(
                payment_intent_id, {"expand": ["latest_charge"]}
            )
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc
        return _parse_sdk_intent(intent.to_dict())


def _declined(exc: stripe.CardError) -> OffSessionPayment:
    """A card error carries the PaymentIntent it left behind, and why."""
    body = exc.json_body if isinstance(exc.json_body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    assert isinstance(error, dict)
    code = str(error.get("decline_code") or error.get("code") or exc.code or "card_declined")
    message = str(error.get("message") or exc.user_message or "The card was declined.")
    intent = error.get("payment_intent")
    if not isinstance(intent, dict) or not intent.get("id"):
        raise StripeFailure(f"Stripe declined the card but named no payment intent ({code})")
    parsed = _parse_sdk_intent(intent)
    outcome = REQUIRES_ACTION if code in _AUTHENTICATION_CODES else FAILED
    return OffSessionPayment(
        id=parsed.id,
        outcome=outcome,
        amount=parsed.amount,
        currency=parsed.currency,
        customer_id=parsed.customer_id,
        failure_code=code[:64],
        failure_message=message[:500],
    )


def _parse_sdk_intent(obj: Mapping[str, Any]) -> OffSessionPayment:
    try:
        return parse_payment_intent(obj)
    except MalformedEvent as exc:
        raise StripeFailure(f"Stripe returned an unreadable payment intent: {exc}") from exc


@lru_cache(maxsize=4)
def stripe_cards(secret_key: str, api_base: str = "") -> StripeCards:
    """One client (one connection pool) per key and base address per process."""
    return StripeCards(secret_key, api_base)
