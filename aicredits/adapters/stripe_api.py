"""Stripe: the only module that talks to it or knows the shape of its objects.

* Checkout: a customer per user, a Checkout Session per "Buy", and reading a session back
  (with its payment intent and charge, for the receipt) for the success page.
* Webhooks: `verify_event` checks the `Stripe-Signature` header on the raw body with the SDK,
  and also refuses timestamps more than five minutes in the future (the SDK checks only the
  past). There is no unsigned path.
* The simulated checkout (no STRIPE_SECRET_KEY): events in Stripe's JSON shape, signed the way
  Stripe signs them, with a dev secret generated locally on first use.

Everything else sees plain dataclasses, never SDK objects.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import stripe
from stripe._base_address import BaseAddresses

from aicredits.adapters.local_secret import load_or_create_secret
from aicredits.domain.checkout_marker import METADATA_KEY as MARKER_METADATA_KEY
from aicredits.domain.errors import AICreditsError

# Stripe's own default, and the window we also apply to timestamps in the future.
SIGNATURE_TOLERANCE_SECONDS = 300
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 30.0
# The SDK retries connection errors and 5xx answers with the same idempotency key.
MAX_NETWORK_RETRIES = 2
MAX_ID_LENGTH = 255
# Stripe's largest page.
LIST_PAGE_SIZE = 100


class StripeFailure(AICreditsError):
    """Stripe could not be reached, or refused the request."""

    code = "stripe_failed"


class CheckoutSessionNotFound(AICreditsError):
    code = "checkout_session_not_found"


class InvalidSignature(AICreditsError):
    """A webhook whose signature, timestamp or secret does not check out."""

    code = "invalid_signature"


class MalformedEvent(AICreditsError):
    """A correctly signed body that is not an event we can read."""

    code = "malformed_event"


# --- what the rest of the app sees ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    id: str
    payment_status: str  # paid | unpaid | no_payment_required
    status: str | None  # open | complete | expired
    amount_total: int | None
    currency: str | None
    client_reference_id: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    payment_intent_id: str | None = None
    customer_id: str | None = None
    charge_id: str | None = None
    receipt_url: str | None = None
    url: str | None = None
    mode: str | None = None  # payment | subscription | setup
    created: int | None = None  # Unix time


@dataclass(frozen=True, slots=True)
class Charge:
    id: str
    payment_intent_id: str | None
    amount: int
    amount_refunded: int  # cumulative, over every refund of this charge
    receipt_url: str | None


@dataclass(frozen=True, slots=True)
class Refund:
    id: str
    charge_id: str | None
    payment_intent_id: str | None
    amount: int
    currency: str
    status: str  # pending | requires_action | succeeded | failed | canceled


@dataclass(frozen=True, slots=True)
class Dispute:
    id: str
    charge_id: str | None
    payment_intent_id: str | None
    amount: int
    currency: str
    reason: str


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    id: str
    type: str
    object: dict[str, Any]
    body: str  # the verified JSON, kept when the event has to wait for its payment
    created: int = 0  # Unix time Stripe made the event (orders subscription updates)


@dataclass(frozen=True, slots=True)
class CheckoutRequest:
    """What one "Buy" asks Stripe for."""

    user_id: int
    pack_id: str
    credits: int
    # The app's keyed marker (domain.checkout_marker): what lets it recognise the session.
    marker: str
    product_name: str
    price_id: str
    amount: int
    currency: str
    customer_id: str
    success_url: str
    cancel_url: str


# --- parsing Stripe's JSON ------------------------------------------------------------------


def read_str(obj: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if isinstance(value, Mapping):  # an expanded object: its id is what we keep
        value = value.get("id")
    if value is None or value == "":
        if required:
            raise MalformedEvent(f"{key} is missing")
        return None
    if not isinstance(value, str) or len(value) > MAX_ID_LENGTH:
        raise MalformedEvent(f"{key} is not a string id")
    return value


def read_int(obj: Mapping[str, Any], key: str, *, required: bool = False) -> int | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise MalformedEvent(f"{key} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedEvent(f"{key} is not a non-negative integer")
    return value


def parse_checkout_session(obj: Mapping[str, Any]) -> CheckoutSession:
    raw_meta = obj.get("metadata") or {}
    if not isinstance(raw_meta, Mapping):
        raise MalformedEvent("metadata is not an object")
    charge_id = receipt_url = None
    intent = obj.get("payment_intent")
    if isinstance(intent, Mapping):  # retrieved with expand=payment_intent.latest_charge
        charge = intent.get("latest_charge")
        if isinstance(charge, Mapping):
            charge_id = read_str(charge, "id")
            receipt_url = read_url(charge.get("receipt_url"))
        elif isinstance(charge, str):
            charge_id = charge
    return CheckoutSession(
        id=read_str(obj, "id", required=True) or "",
        payment_status=read_str(obj, "payment_status") or "unpaid",
        status=read_str(obj, "status"),
        amount_total=read_int(obj, "amount_total"),
        currency=(read_str(obj, "currency") or "").lower() or None,
        client_reference_id=read_str(obj, "client_reference_id"),
        metadata={str(k): str(v) for k, v in raw_meta.items()},
        payment_intent_id=read_str(obj, "payment_intent"),
        customer_id=read_str(obj, "customer"),
        charge_id=charge_id,
        receipt_url=receipt_url,
        url=read_url(obj.get("url")),
        mode=read_str(obj, "mode"),
        created=read_int(obj, "created"),
    )


def read_url(value: object) -> str | None:
    return value if isinstance(value, str) and value.startswith("https://") else None


def parse_charge(obj: Mapping[str, Any]) -> Charge:
    return Charge(
        id=read_str(obj, "id", required=True) or "",
        payment_intent_id=read_str(obj, "payment_intent"),
        amount=read_int(obj, "amount", required=True) or 0,
        amount_refunded=read_int(obj, "amount_refunded", required=True) or 0,
        receipt_url=read_url(obj.get("receipt_url")),
    )


def parse_refund(obj: Mapping[str, Any]) -> Refund:
    return Refund(
        id=read_str(obj, "id", required=True) or "",
        charge_id=read_str(obj, "charge"),
        payment_intent_id=read_str(obj, "payment_intent"),
        amount=read_int(obj, "amount", required=True) or 0,
        currency=(read_str(obj, "currency") or "").lower(),
        status=read_str(obj, "status") or "",
    )


def parse_dispute(obj: Mapping[str, Any]) -> Dispute:
    return Dispute(
        id=read_str(obj, "id", required=True) or "",
        charge_id=read_str(obj, "charge"),
        payment_intent_id=read_str(obj, "payment_intent"),
        amount=read_int(obj, "amount") or 0,
        currency=(read_str(obj, "currency") or "").lower(),
        reason=(read_str(obj, "reason") or "unspecified")[:100],
    )


def parse_event(body: str) -> WebhookEvent:
    """An event from JSON already verified (or stored by us after verifying it)."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise MalformedEvent("the body is not JSON") from exc
    if not isinstance(data, dict):
        raise MalformedEvent("the body is not a JSON object")
    payload = data.get("data")
    obj = payload.get("object") if isinstance(payload, dict) else None
    event_type = data.get("type")
    if not isinstance(obj, dict) or not isinstance(event_type, str) or not event_type:
        raise MalformedEvent("the event has no type or no data.object")
    if len(event_type) > 100:
        raise MalformedEvent("the event type is too long")
    event_id = read_str(data, "id", required=True) or ""
    created = read_int(data, "created") or 0
    return WebhookEvent(id=event_id, type=event_type, object=obj, body=body, created=created)


# --- webhook signatures ---------------------------------------------------------------------


def _signed_timestamp(header: str) -> int:
    # The same reading as the SDK's: the first `t=` element.
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            return int(value)
    raise ValueError("no timestamp")


def verify_event(
    payload: bytes,
    header: str | None,
    secret: str | None,
    *,
    tolerance: int = SIGNATURE_TOLERANCE_SECONDS,
    now: float | None = None,
) -> WebhookEvent:
    """The event in a webhook body, once its signature and timestamp check out."""
    if not secret:
        raise InvalidSignature("no webhook secret is configured, so no event can be trusted")
    if not header:
        raise InvalidSignature("the Stripe-Signature header is missing")
    try:
        body = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidSignature("the body is not UTF-8, so it cannot be what Stripe signed") from exc
    try:
        stripe.WebhookSignature.verify_header(body, header, secret, tolerance)
        timestamp = _signed_timestamp(header)
    except (stripe.SignatureVerificationError, ValueError) as exc:
        raise InvalidSignature(str(exc).split("\n")[0]) from exc
    if timestamp > (time.time() if now is None else now) + tolerance:
        raise InvalidSignature("the signature's timestamp is in the future")
    return parse_event(body)


def signature_header(body: str, secret: str, timestamp: int) -> str:
    """`Stripe-Signature` for a body, exactly as Stripe computes it."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


# --- the API --------------------------------------------------------------------------------


def checkout_session_params(request: CheckoutRequest) -> dict[str, Any]:
    metadata = {
        "user_id": str(request.user_id),
        "pack_id": request.pack_id,
        "credits": str(request.credits),
        MARKER_METADATA_KEY: request.marker,
    }
    if request.price_id:
        line_item: dict[str, Any] = {"price": request.price_id, "quantity": 1}
    else:
        line_item = {
            "price_data": {
                "currency": request.currency,
                "unit_amount": request.amount,
                "product_data": {"name": request.product_name},
            },
            "quantity": 1,
        }
    return {
        "mode": "payment",
        "customer": request.customer_id,
        "client_reference_id": str(request.user_id),
        "line_items": [line_item],
        "metadata": metadata,
        "payment_intent_data": {"metadata": metadata},
        "success_url": request.success_url,
        "cancel_url": request.cancel_url,
    }


@dataclass(frozen=True, slots=True)
class CreatedSession:
    id: str
    url: str
    amount_total: int | None
    currency: str | None


class StripeApi:
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

    @property
    def client(self) -> stripe.StripeClient:
        """The SDK client, for the other Stripe adapters (adapters.stripe_billing)."""
        return self._client

    def create_customer(self, *, user_id: int, email: str | None, idempotency_key: str) -> str:
        params: dict[str, Any] = {"metadata": {"user_id": str(user_id)}}
        if email:
            params["email"] = email
        try:
            customer = self._client.v1.customers.create(
                params,  # type: ignore[arg-type]
                {"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc
        return str(customer.id)

    def create_checkout_session(
        self, request: CheckoutRequest, *, idempotency_key: str
    ) -> CreatedSession:
        try:
            session = self._client.v1.checkout.sessions.create(
                checkout_session_params(request),  # type: ignore[arg-type]
                {"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc
        parsed = _parse_sdk_session(session)
        if not parsed.url:
            raise StripeFailure("Stripe returned a Checkout Session without a URL")
        return CreatedSession(
            id=parsed.id, url=parsed.url, amount_total=parsed.amount_total, currency=parsed.currency
        )

    def retrieve_checkout_session(self, session_id: str) -> CheckoutSession:
        try:
            session = self._client.v1.checkout.sessions.retrieve(
                session_id, {"expand": ["payment_intent.latest_charge"]}
            )
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise CheckoutSessionNotFound(session_id) from exc
            raise StripeFailure(explain_error(exc)) from exc
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc
        return _parse_sdk_session(session)

    def retrieve_price(self, price_id: str) -> tuple[int, str]:
        """A Price's unit amount and currency (what a pack sold by a Stripe Price costs)."""
        try:
            price = self._client.v1.prices.retrieve(price_id)
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc
        amount = price.unit_amount
        if not isinstance(amount, int):
            raise StripeFailure(f"the Price {price_id} has no fixed unit amount")
        return amount, str(price.currency or "").lower()

    def list_checkout_sessions(self, *, created_from: int) -> Iterator[CheckoutSession]:
        """Every Checkout Session created since `created_from` (Unix time), newest first,
        a page at a time through the SDK's auto-pagination."""
        try:
            listed = self._client.v1.checkout.sessions.list(
                {"created": {"gte": created_from}, "limit": LIST_PAGE_SIZE}
            )
            for session in listed.auto_paging_iter():
                yield _parse_sdk_session(session)
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc

    def list_refunds(self, *, created_from: int) -> Iterator[Refund]:
        """Every refund created since `created_from` (Unix time), newest first."""
        try:
            listed = self._client.v1.refunds.list(
                {"created": {"gte": created_from}, "limit": LIST_PAGE_SIZE}
            )
            for refund in listed.auto_paging_iter():
                try:
                    yield parse_refund(refund.to_dict())
                except MalformedEvent as exc:
                    raise StripeFailure(f"Stripe returned an unreadable refund: {exc}") from exc
        except stripe.StripeError as exc:
            raise StripeFailure(explain_error(exc)) from exc


def _parse_sdk_session(session: Any) -> CheckoutSession:
    try:
        return parse_checkout_session(session.to_dict())
    except MalformedEvent as exc:
        raise StripeFailure(f"Stripe returned an unreadable Checkout Session: {exc}") from exc


def explain_error(exc: stripe.StripeError) -> str:
    return exc.user_message or type(exc).__name__


@lru_cache(maxsize=4)
def stripe_api(secret_key: str, api_base: str = "") -> StripeApi:
    """One client (one connection pool) per key and base address per process."""
    return StripeApi(secret_key, api_base)


# --- the simulated checkout -----------------------------------------------------------------


def load_or_create_dev_secret(path: Path) -> str:
    """The simulated checkout's webhook secret: made once per machine, readable only by its
    owner, never committed (.data/ is ignored). Workers starting together agree on one."""
    return load_or_create_secret(path, prefix="whsec_dev_")


def simulated_event(event_type: str, obj: dict[str, Any], *, created: int) -> str:
    """An event body in Stripe's JSON shape."""
    event = {
        "id": "evt_sim_" + secrets.token_hex(12),
        "object": "event",
        "api_version": stripe.api_version,
        "created": created,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }
    return json.dumps(event, separators=(",", ":"))


def post_event(url: str, body: str, header: str) -> int:
    """Deliver a signed event the way Stripe does: a POST to the webhook. Returns the status."""
    response = httpx.post(
        url,
        content=body.encode(),
        headers={"Content-Type": "application/json", "Stripe-Signature": header},
        timeout=httpx.Timeout(READ_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS),
    )
    return response.status_code
