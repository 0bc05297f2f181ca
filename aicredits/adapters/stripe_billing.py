"""Stripe Billing: subscriptions, their invoices and the Customer Portal.

The shapes of Stripe's Subscription and Invoice objects, read the way both older API
versions (`subscription`, `current_period_*` on the subscription, `price` on an invoice line)
and newer ones (`parent.subscription_details`, `current_period_*` on the item,
`pricing.price_details`) write them, into plain dataclasses; and the two calls the app makes:
a Checkout Session in subscription mode and a portal session.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import stripe

from aicredits.adapters.stripe_api import (
    MalformedEvent,
    StripeApi,
    StripeFailure,
    read_int,
    read_str,
    read_url,
)
from aicredits.domain.checkout_marker import METADATA_KEY as MARKER_METADATA_KEY


@dataclass(frozen=True, slots=True)
class SubscriptionObject:
    id: str
    customer_id: str
    status: str
    price_id: str | None
    current_period_start: int | None
    current_period_end: int | None
    cancel_at_period_end: bool
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    price_id: str | None
    amount: int  # signed, minor units: a proration's unused-time credit is negative
    period_start: int | None
    period_end: int | None
    proration: bool


@dataclass(frozen=True, slots=True)
class InvoiceObject:
    id: str
    customer_id: str
    subscription_id: str | None
    billing_reason: str
    status: str
    amount_paid: int
    amount_due: int
    currency: str
    hosted_invoice_url: str | None
    invoice_pdf: str | None
    lines: tuple[InvoiceLine, ...]
    # The subscription's metadata as it was when the invoice was made (where our marker is).
    subscription_metadata: dict[str, str] = field(default_factory=dict)


def _mapping(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def _metadata(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise MalformedEvent("metadata is not an object")
    return {str(k): str(v) for k, v in raw.items()}


def _items(obj: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    data = _mapping(obj, key).get("data")
    if data is None:
        return []
    if not isinstance(data, list):
        raise MalformedEvent(f"{key}.data is not a list")
    return [item for item in data if isinstance(item, Mapping)]


def parse_subscription(obj: Mapping[str, Any]) -> SubscriptionObject:
    items = _items(obj, "items")
    first = items[0] if items else {}
    price = first.get("price")
    price_id = read_str(first, "price") if isinstance(price, Mapping | str) else None
    return SubscriptionObject(
        id=read_str(obj, "id", required=True) or "",
        customer_id=read_str(obj, "customer", required=True) or "",
        status=(read_str(obj, "status") or "incomplete")[:32],
        price_id=price_id,
        current_period_start=read_int(first, "current_period_start")
        or read_int(obj, "current_period_start"),
        current_period_end=read_int(first, "current_period_end")
        or read_int(obj, "current_period_end"),
        cancel_at_period_end=obj.get("cancel_at_period_end") is True,
        metadata=_metadata(obj.get("metadata")),
    )


def _line_price(line: Mapping[str, Any]) -> str | None:
    details = _mapping(_mapping(line, "pricing"), "price_details")
    if details:
        return read_str(details, "price")
    if isinstance(line.get("price"), Mapping | str):
        return read_str(line, "price")
    return None


def _line_proration(line: Mapping[str, Any]) -> bool:
    if line.get("proration") is True:
        return True
    parent = _mapping(line, "parent")
    for key in ("subscription_item_details", "invoice_item_details"):
        if _mapping(parent, key).get("proration") is True:
            return True
    return False


def _signed_int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedEvent(f"{key} is not an integer")
    return value


def parse_invoice(obj: Mapping[str, Any]) -> InvoiceObject:
    details = _mapping(_mapping(obj, "parent"), "subscription_details") or _mapping(
        obj, "subscription_details"
    )
    subscription_id = read_str(details, "subscription") or read_str(obj, "subscription")
    lines = tuple(
        InvoiceLine(
            price_id=_line_price(line),
            amount=_signed_int(line, "amount"),
            period_start=read_int(_mapping(line, "period"), "start"),
            period_end=read_int(_mapping(line, "period"), "end"),
            proration=_line_proration(line),
        )
        for line in _items(obj, "lines")
    )
    return InvoiceObject(
        id=read_str(obj, "id", required=True) or "",
        customer_id=read_str(obj, "customer", required=True) or "",
        subscription_id=subscription_id,
        billing_reason=(read_str(obj, "billing_reason") or "")[:40],
        status=(read_str(obj, "status") or "")[:16],
        amount_paid=read_int(obj, "amount_paid") or 0,
        amount_due=read_int(obj, "amount_due") or 0,
        currency=(read_str(obj, "currency") or "").lower()[:8],
        hosted_invoice_url=read_url(obj.get("hosted_invoice_url")),
        invoice_pdf=read_url(obj.get("invoice_pdf")),
        lines=lines,
        subscription_metadata=_metadata(details.get("metadata")),
    )


# --- the API --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriptionCheckoutRequest:
    user_id: int
    plan_id: str
    price_id: str
    marker: str  # domain.checkout_marker: how the app recognises the subscription later
    customer_id: str
    success_url: str
    cancel_url: str


def subscription_checkout_params(request: SubscriptionCheckoutRequest) -> dict[str, Any]:
    metadata = {
        "user_id": str(request.user_id),
        "plan_id": request.plan_id,
        MARKER_METADATA_KEY: request.marker,
    }
    return {
        "mode": "subscription",
        "customer": request.customer_id,
        "client_reference_id": str(request.user_id),
        "line_items": [{"price": request.price_id, "quantity": 1}],
        "metadata": metadata,
        # Copied onto the subscription, and from it onto each of its invoices.
        "subscription_data": {"metadata": metadata},
        "success_url": request.success_url,
        "cancel_url": request.cancel_url,
    }


def create_subscription_checkout(
    api: StripeApi, request: SubscriptionCheckoutRequest, *, idempotency_key: str
) -> str:
    """A Checkout Session in subscription mode; returns its URL."""
    try:
        session = api.client.v1.checkout.sessions.create(
            subscription_checkout_params(request),  # type: ignore[arg-type]
            {"idempotency_key": idempotency_key},
        )
    except stripe.StripeError as exc:
        raise StripeFailure(exc.user_message or type(exc).__name__) from exc
    url = read_url(session.to_dict().get("url"))
    if not url:
        raise StripeFailure("Stripe returned a Checkout Session without a URL")
    return url


def create_portal_session(api: StripeApi, *, customer_id: str, return_url: str) -> str:
    """A Customer Portal session for the customer; returns its URL."""
    try:
        session = api.client.v1.billing_portal.sessions.create(
            {"customer": customer_id, "return_url": return_url}
        )
    except stripe.StripeError as exc:
        raise StripeFailure(exc.user_message or type(exc).__name__) from exc
    url = read_url(session.to_dict().get("url"))
    if not url:
        raise StripeFailure("Stripe returned a portal session without a URL")
    return url


def create_overage_item(
    api: StripeApi,
    *,
    customer_id: str,
    subscription_id: str | None,
    price_id: str,
    quantity: int,
    description: str,
    idempotency_key: str,
) -> str:
    """An invoice item for a period's metered overage (`quantity` credits of the plan's
    overage Price), picked up by the subscription's next invoice. Returns its id."""
    params: dict[str, Any] = {
        "customer": customer_id,
        "pricing": {"price": price_id},
        "quantity": quantity,
        "description": description,
    }
    if subscription_id:
        params["subscription"] = subscription_id
    try:
        item = api.client.v1.invoice_items.create(
            params,  # type: ignore[arg-type]
            {"idempotency_key": idempotency_key},
        )
    except stripe.StripeError as exc:
        raise StripeFailure(exc.user_message or type(exc).__name__) from exc
    return str(item.id)
