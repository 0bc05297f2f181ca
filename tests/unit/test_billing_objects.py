"""Stripe's Subscription and Invoice objects read in both the older shape (`subscription`,
`current_period_*` on the subscription, `price` and `proration` on a line) and the newer one
(`parent.subscription_details`, `current_period_*` on the item, `pricing.price_details`); and
the PLANS setting's checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from aicredits.adapters.stripe_api import MalformedEvent
from aicredits.adapters.stripe_billing import parse_invoice, parse_subscription
from aicredits.settings import Plan


def test_an_older_subscription_shape() -> None:
    sub = parse_subscription(
        {
            "id": "sub_1",
            "customer": "cus_1",
            "status": "past_due",
            "current_period_start": 100,
            "current_period_end": 200,
            "cancel_at_period_end": True,
            "metadata": {"aicredits_ref": "x"},
            "items": {"data": [{"price": {"id": "price_team"}}]},
        }
    )
    assert (sub.price_id, sub.status, sub.current_period_start, sub.current_period_end) == (
        "price_team",
        "past_due",
        100,
        200,
    )
    assert sub.cancel_at_period_end and sub.metadata == {"aicredits_ref": "x"}


def test_a_newer_subscription_shape_reads_the_period_from_the_item() -> None:
    sub = parse_subscription(
        {
            "id": "sub_1",
            "customer": {"id": "cus_1"},
            "status": "active",
            "items": {
                "data": [{"price": "price_pro", "current_period_start": 5, "current_period_end": 9}]
            },
        }
    )
    assert (sub.customer_id, sub.price_id, sub.current_period_end) == ("cus_1", "price_pro", 9)
    assert not sub.cancel_at_period_end


def test_an_older_invoice_shape() -> None:
    invoice = parse_invoice(
        {
            "id": "in_1",
            "customer": "cus_1",
            "subscription": "sub_1",
            "subscription_details": {"metadata": {"k": "v"}},
            "billing_reason": "subscription_update",
            "status": "paid",
            "amount_paid": 1500,
            "currency": "USD",
            "hosted_invoice_url": "https://invoice.stripe.com/i/1",
            "invoice_pdf": "http://not-https.example/pdf",
            "lines": {
                "data": [
                    {"amount": -500, "price": {"id": "price_team"}, "proration": True,
                     "period": {"start": 1, "end": 2}},
                    {"amount": 2000, "price": {"id": "price_pro"}, "proration": True,
                     "period": {"start": 1, "end": 2}},
                ]
            },
        }
    )  # fmt: skip
    assert invoice.subscription_id == "sub_1"
    assert invoice.subscription_metadata == {"k": "v"}
    assert invoice.currency == "usd"
    assert invoice.invoice_pdf is None  # only https links are kept
    assert [(line.price_id, line.amount, line.proration) for line in invoice.lines] == [
        ("price_team", -500, True),
        ("price_pro", 2000, True),
    ]


def test_a_newer_invoice_shape() -> None:
    invoice = parse_invoice(
        {
            "id": "in_2",
            "customer": "cus_1",
            "parent": {"subscription_details": {"subscription": "sub_2", "metadata": {"k": "w"}}},
            "lines": {
                "data": [
                    {
                        "amount": 2000,
                        "pricing": {"price_details": {"price": "price_team"}},
                        "parent": {"subscription_item_details": {"proration": False}},
                        "period": {"start": 10, "end": 20},
                    }
                ]
            },
        }
    )
    assert (invoice.subscription_id, invoice.subscription_metadata) == ("sub_2", {"k": "w"})
    [line] = invoice.lines
    assert (line.price_id, line.proration, line.period_end) == ("price_team", False, 20)


def test_an_unreadable_invoice_is_malformed() -> None:
    with pytest.raises(MalformedEvent):
        parse_invoice({"id": "in_3", "customer": "cus_1", "lines": {"data": [{"amount": "1"}]}})
    with pytest.raises(MalformedEvent):
        parse_invoice({"id": "in_4"})


def test_a_plan_needs_a_price_and_a_metered_plan_a_ceiling() -> None:
    with pytest.raises(ValidationError, match="needs a price_id or an amount"):
        Plan(id="team", included_credits=10)
    with pytest.raises(ValidationError, match="needs metered_ceiling_credits"):
        Plan(id="team", included_credits=10, price_id="price_1", overage="metered")
    assert Plan(id="team", included_credits=10, amount=100).overage == "prepaid"
