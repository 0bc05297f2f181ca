"""Monthly plans on SQLite and Postgres: subscribing through the real SDK against the fake
Stripe, then Stripe's signed subscription and invoice events, each applied once: included
credits per paid invoice (expiring at the period's end), renewal, an upgrade's proration,
a failed payment and its retry, cancellation at the period's end; verify-ledger clean after
each. The simulated subscription, portal and "Simulate next month" run over real HTTP."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import credit_lots, invoices, ledger_entries, subscriptions
from aicredits.domain.errors import InsufficientCredits
from aicredits.services import (
    checkout,
    jobs,
    ledger,
    overage,
    receipts,
    stripe_webhook,
    thresholds,
)
from aicredits.services.plans import current_subscription
from aicredits.services.subscriptions import list_invoices, plan_usage
from aicredits.services.verify import verify_ledger
from aicredits.settings import get_settings
from tests.factories import make_user, new_key
from tests.integration import fake_stripe as fs
from tests.integration.fake_stripe import PUBLIC, FakeStripe, Shop, make_shop
from tests.servers import serve_asgi
from tests.smtp_sink import smtp_sink

TEAM = 25_000
PRO = 70_000
DAY = 86_400
PLANS = json.dumps(
    [
        {"id": "team", "label": "Team", "included_credits": TEAM, "price_id": "price_team"},
        {"id": "pro", "label": "Pro", "included_credits": PRO, "price_id": "price_pro"},
    ]
)


@pytest.fixture(scope="module")
def stripe_server() -> Iterator[tuple[FakeStripe, str]]:
    fake = FakeStripe(prices={"price_team": (2_000, "usd"), "price_pro": (5_000, "usd")})
    with serve_asgi(fake.app, ready_path="/health") as base:
        yield fake, base


@pytest.fixture
def shop(
    db: Database, monkeypatch: pytest.MonkeyPatch, stripe_server: tuple[FakeStripe, str]
) -> Iterator[Shop]:
    stripe_server[0].requests.clear()
    yield make_shop(
        db,
        monkeypatch,
        STRIPE_SECRET_KEY="sk_test_fake",
        STRIPE_API_BASE=stripe_server[1],
        PLANS=PLANS,
    )
    get_settings.cache_clear()


# --- Stripe-shaped objects, written here independently of the app's parser ------------------


def subscription(
    sub: Subscriber,
    *,
    price: str,
    start: int,
    end: int,
    status: str = "active",
    cancel_at_period_end: bool = False,
) -> dict[str, Any]:
    return {
        "id": sub.subscription_id,
        "object": "subscription",
        "customer": sub.customer_id,
        "status": status,
        "cancel_at_period_end": cancel_at_period_end,
        "metadata": sub.metadata,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_1",
                    "object": "subscription_item",
                    "price": {"id": price, "object": "price"},
                    "current_period_start": start,
                    "current_period_end": end,
                }
            ],
        },
    }


def line(price: str, amount: int, start: int, end: int, *, proration: bool = False) -> Any:
    return {
        "id": f"il_{uuid.uuid4().hex[:8]}",
        "object": "line_item",
        "amount": amount,
        "currency": "usd",
        "period": {"start": start, "end": end},
        "pricing": {"price_details": {"price": price}},
        "parent": {"subscription_item_details": {"proration": proration}},
    }


def invoice(
    sub: Subscriber,
    invoice_id: str,
    lines: list[Any],
    *,
    reason: str = "subscription_cycle",
    status: str = "paid",
) -> dict[str, Any]:
    total = sum(item["amount"] for item in lines)
    return {
        "id": invoice_id,
        "object": "invoice",
        "customer": sub.customer_id,
        "billing_reason": reason,
        "status": status,
        "amount_due": max(total, 0),
        "amount_paid": max(total, 0) if status == "paid" else 0,
        "currency": "usd",
        "hosted_invoice_url": f"https://invoice.stripe.test/i/{invoice_id}",
        "invoice_pdf": f"https://pay.stripe.test/invoice/{invoice_id}/pdf",
        "parent": {
            "type": "subscription_details",
            "subscription_details": {
                "subscription": sub.subscription_id,
                "metadata": sub.metadata,
            },
        },
        "lines": {"object": "list", "data": lines},
    }


@dataclass
class Subscriber:
    user_id: int
    customer_id: str
    metadata: dict[str, str]
    subscription_id: str


def subscribe(shop: Shop, fake: FakeStripe, plan: str = "team") -> Subscriber:
    """ "Subscribe" as the credits page posts it; Stripe copies subscription_data.metadata
    onto the subscription and from there onto its invoices."""
    uid = make_user(shop.db, credits=1_000)  # the trial grant, kept alongside the plan
    response = shop.client.post(
        "/billing/subscribe", data={"plan": plan}, headers=shop.session_cookie(uid)
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"].startswith("https://checkout.stripe.test/c/pay/")
    params = fake.calls("POST", "/v1/checkout/sessions")[-1].params
    return Subscriber(
        uid, params["customer"], params["subscription_data"]["metadata"], f"sub_{uuid.uuid4().hex}"
    )


def deliver(shop: Shop, event_type: str, obj: dict[str, Any], *, at: datetime, **kw: Any) -> str:
    body = fs.event(event_type, obj, **kw)
    result = stripe_webhook.handle_webhook(
        shop.db,
        shop.settings,
        payload=body.encode(),
        signature=fs.sign(body, shop.secret),
        now=at,
    )
    return result.outcome


def ts(moment: datetime) -> int:
    return int(moment.timestamp())


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def entries(db: Database, uid: int, kind: str) -> list[int]:
    with db.read() as conn:
        return list(
            conn.execute(
                sa.select(ledger_entries.c.amount)
                .where(ledger_entries.c.user_id == uid, ledger_entries.c.kind == kind)
                .order_by(ledger_entries.c.id)
            ).scalars()
        )


def spend(db: Database, uid: int, credits: int, now: datetime) -> None:
    hold = ledger.reserve(db, user_id=uid, credits=credits, request_id=new_key("req"), now=now)
    ledger.settle(db, hold=hold, actual_credits=credits, now=now)


def started(shop: Shop, fake: FakeStripe, plan: str = "team") -> tuple[Subscriber, int, int]:
    """A subscriber in the first day of a period [t0, t1]."""
    sub = subscribe(shop, fake, plan)
    t0 = int(time.time()) - 3600
    t1 = t0 + 30 * DAY
    now = at(t0 + 60)
    price = f"price_{plan}"
    sub_obj = subscription(sub, price=price, start=t0, end=t1)
    assert deliver(shop, "customer.subscription.created", sub_obj, at=now) == (
        "subscription_active"
    )
    first = invoice(sub, "in_first", [line(price, 2_000, t0, t1)], reason="subscription_create")
    assert deliver(shop, "invoice.paid", first, at=now) == "granted"
    return sub, t0, t1


# --- subscribing ------------------------------------------------------------------------------


def test_subscribing_opens_a_subscription_checkout_for_the_plans_price(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    fake = stripe_server[0]
    sub = subscribe(shop, fake, "pro")
    params = fake.calls("POST", "/v1/checkout/sessions")[-1].params
    assert params["mode"] == "subscription"
    assert params["line_items"] == [{"price": "price_pro", "quantity": "1"}]
    assert params["client_reference_id"] == str(sub.user_id)
    assert sub.metadata["aicredits_ref"].startswith(f"ac1.{sub.user_id}.plan.")
    assert sub.customer_id.startswith("cus_fake_")
    # Subscribing again starts another session for the same customer (one per user).
    again = shop.client.post(
        "/billing/subscribe", data={"plan": "team"}, headers=shop.session_cookie(sub.user_id)
    )
    assert again.status_code == 303
    assert fake.calls("POST", "/v1/checkout/sessions")[-1].params["customer"] == sub.customer_id
    assert len(fake.calls("POST", "/v1/customers")) == 1
    unknown = shop.client.post(
        "/billing/subscribe", data={"plan": "gold"}, headers=shop.session_cookie(sub.user_id)
    )
    assert unknown.status_code == 400


def test_a_live_subscriber_is_sent_to_the_portal_instead(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    fake = stripe_server[0]
    sub, _, _ = started(shop, fake)
    again = shop.client.post(
        "/billing/subscribe", data={"plan": "pro"}, headers=shop.session_cookie(sub.user_id)
    )
    assert again.status_code == 400
    assert "Manage billing" in again.text
    portal = shop.client.post("/billing/portal", headers=shop.session_cookie(sub.user_id))
    assert portal.status_code == 303
    assert portal.headers["location"].startswith("https://billing.stripe.test/p/session/")
    params = fake.calls("POST", "/v1/billing_portal/sessions")[-1].params
    assert params == {"customer": sub.customer_id, "return_url": f"{PUBLIC}/credits"}


# --- invoices grant once ----------------------------------------------------------------------


def test_a_paid_invoice_grants_the_included_credits_once_until_the_period_end(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    sub = subscribe(shop, stripe_server[0])
    t0 = int(time.time()) - 3600
    t1 = t0 + 30 * DAY
    created = subscription(sub, price="price_team", start=t0, end=t1)
    assert shop.deliver(fs.event("customer.subscription.created", created)).status_code == 200
    body = fs.event("invoice.paid", invoice(sub, "in_first", [line("price_team", 2_000, t0, t1)]))
    for _ in range(3):  # Stripe's retries of one event, each freshly signed
        assert shop.deliver(body).json()["outcome"] == "granted"
    # The same invoice under another event id grants nothing more.
    again = invoice(sub, "in_first", [line("price_team", 2_000, t0, t1)])
    assert deliver(shop, "invoice.paid", again, at=at(t0 + 120)) == "already_granted"
    assert ledger.get_balance(shop.db, user_id=sub.user_id).balance == 1_000 + TEAM
    with shop.db.read() as conn:
        lot = conn.execute(sa.select(credit_lots).where(credit_lots.c.user_id == sub.user_id)).one()
        row = conn.execute(sa.select(invoices)).one()
    assert (lot.amount, lot.expires_at) == (TEAM, at(t1))
    assert (row.status, row.credits_granted, row.plan_id) == ("paid", TEAM, "team")
    usage = plan_usage(shop.db, shop.settings, user_id=sub.user_id)
    assert usage is not None
    assert (usage.plan, usage.status, usage.included, usage.remaining) == (
        "Team",
        "active",
        TEAM,
        TEAM,
    )
    assert usage.period_end == at(t1)
    [listed] = list_invoices(shop.db, shop.settings, user_id=sub.user_id)
    assert listed.hosted_invoice_url == "https://invoice.stripe.test/i/in_first"
    assert listed.invoice_pdf == "https://pay.stripe.test/invoice/in_first/pdf"
    assert verify_ledger(shop.db) == []


def test_plan_credits_are_spent_before_the_trial_grant(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    sub, t0, _ = started(shop, stripe_server[0])
    spend(shop.db, sub.user_id, 5_000, at(t0 + 600))
    usage = plan_usage(shop.db, shop.settings, user_id=sub.user_id)
    assert usage is not None and (usage.used, usage.remaining) == (5_000, TEAM - 5_000)
    assert verify_ledger(shop.db) == []


def test_renewal_grants_the_new_period_and_expires_the_old_periods_rest(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    sub, t0, t1 = started(shop, stripe_server[0])
    spend(shop.db, sub.user_id, 5_000, at(t0 + 600))
    t2 = t1 + 30 * DAY
    later = at(t1 + 3600)
    renewed = subscription(sub, price="price_team", start=t1, end=t2)
    assert deliver(shop, "customer.subscription.updated", renewed, at=later) == (
        "subscription_active"
    )
    cycle = invoice(sub, "in_second", [line("price_team", 2_000, t1, t2)])
    assert deliver(shop, "invoice.paid", cycle, at=later) == "granted"
    # The old period's 20,000 left with an expiry entry; the trial grant is untouched.
    assert entries(shop.db, sub.user_id, "expiry") == [-(TEAM - 5_000)]
    assert ledger.get_balance(shop.db, user_id=sub.user_id).balance == 1_000 + TEAM
    usage = plan_usage(shop.db, shop.settings, user_id=sub.user_id)
    assert usage is not None
    assert (usage.included, usage.remaining, usage.period_end) == (TEAM, TEAM, at(t2))
    # The old rest left before the new grant: the usage warnings count the new period from
    # zero, not the expiry as credits used.
    allowance = thresholds.current_allowance(shop.db, user_id=sub.user_id)
    assert (allowance.size, allowance.used) == (1_000 + TEAM, 0)
    assert verify_ledger(shop.db) == []


def test_an_older_event_delivered_late_changes_nothing(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    sub, t0, t1 = started(shop, stripe_server[0])
    newer = subscription(sub, price="price_team", start=t0, end=t1, status="past_due")
    deliver(shop, "customer.subscription.updated", newer, at=at(t0 + 60))
    older = subscription(sub, price="price_team", start=t0, end=t1)
    body = json.loads(fs.event("customer.subscription.updated", older))
    body["created"] -= 3600
    payload = json.dumps(body)
    result = stripe_webhook.handle_webhook(
        shop.db, shop.settings, payload=payload.encode(), signature=fs.sign(payload, shop.secret)
    )
    assert result.outcome == "stale_subscription_event"
    found = current_subscription(shop.db, user_id=sub.user_id)
    assert found is not None and found.status == "past_due"


# --- plan changes -----------------------------------------------------------------------------


def test_an_upgrade_grants_the_prorated_difference_keyed_by_its_invoice(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    sub, t0, t1 = started(shop, stripe_server[0])
    middle = t0 + 15 * DAY
    upgraded = subscription(sub, price="price_pro", start=t0, end=t1)
    deliver(shop, "customer.subscription.updated", upgraded, at=at(middle))
    proration = invoice(
        sub,
        "in_upgrade",
        [
            line("price_team", -1_000, middle, t1, proration=True),
            line("price_pro", 2_500, middle, t1, proration=True),
        ],
        reason="subscription_update",
    )
    assert deliver(shop, "invoice.paid", proration, at=at(middle)) == "granted"
    assert deliver(shop, "invoice.paid", proration, at=at(middle)) == "already_granted"
    half = (PRO - TEAM) // 2  # half the period was left
    assert entries(shop.db, sub.user_id, "grant")[-1] == half
    assert ledger.get_balance(shop.db, user_id=sub.user_id).balance == 1_000 + TEAM + half
    usage = plan_usage(shop.db, shop.settings, user_id=sub.user_id)
    assert usage is not None and (usage.plan, usage.included) == ("Pro", TEAM + half)
    assert verify_ledger(shop.db) == []


def test_a_downgrade_grants_nothing_until_the_next_period(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    sub, t0, t1 = started(shop, stripe_server[0], "pro")
    middle = t0 + 10 * DAY
    proration = invoice(
        sub,
        "in_down",
        [
            line("price_pro", -3_000, middle, t1, proration=True),
            line("price_team", 1_200, middle, t1, proration=True),
        ],
        reason="subscription_update",
    )
    assert deliver(shop, "invoice.paid", proration, at=at(middle)) == "no_credits"
    assert ledger.get_balance(shop.db, user_id=sub.user_id).balance == 1_000 + PRO
    assert verify_ledger(shop.db) == []


# --- failed payments and cancellation ---------------------------------------------------------


def test_a_failed_payment_then_a_successful_retry_grants_once(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    sub, _, t1 = started(shop, stripe_server[0])
    t2 = t1 + 30 * DAY
    later = at(t1 + 600)
    deliver(
        shop,
        "customer.subscription.updated",
        subscription(sub, price="price_team", start=t1, end=t2, status="past_due"),
        at=later,
    )
    failed = invoice(sub, "in_retry", [line("price_team", 2_000, t1, t2)], status="open")
    assert deliver(shop, "invoice.payment_failed", failed, at=later) == "payment_failed"
    usage = plan_usage(shop.db, shop.settings, user_id=sub.user_id)
    assert usage is not None and (usage.status, usage.included) == ("past_due", 0)
    assert [i.status for i in list_invoices(shop.db, shop.settings, user_id=sub.user_id)] == [
        "payment_failed",
        "paid",
    ]
    # Stripe's retry succeeds: the same invoice is paid, and grants once.
    retried = at(t1 + 3 * DAY)
    paid = invoice(sub, "in_retry", [line("price_team", 2_000, t1, t2)])
    assert deliver(shop, "invoice.paid", paid, at=retried) == "granted"
    assert deliver(shop, "invoice.payment_failed", failed, at=retried) == "payment_failed"
    deliver(
        shop,
        "customer.subscription.updated",
        subscription(sub, price="price_team", start=t1, end=t2),
        at=retried,
    )
    usage = plan_usage(shop.db, shop.settings, user_id=sub.user_id)
    assert usage is not None and (usage.status, usage.included) == ("active", TEAM)
    with shop.db.read() as conn:
        statuses = conn.execute(
            sa.select(invoices.c.status).where(invoices.c.invoice_id == "in_retry")
        ).scalar_one()
    assert statuses == "paid"  # a late failure notice does not undo the payment
    assert verify_ledger(shop.db) == []


def test_cancelling_takes_effect_at_the_period_end(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    sub, t0, t1 = started(shop, stripe_server[0])
    deliver(
        shop,
        "customer.subscription.updated",
        subscription(sub, price="price_team", start=t0, end=t1, cancel_at_period_end=True),
        at=at(t0 + DAY),
    )
    usage = plan_usage(shop.db, shop.settings, user_id=sub.user_id)
    assert usage is not None and usage.cancel_at_period_end and usage.status == "active"
    end = at(t1 + 1)
    gone = subscription(sub, price="price_team", start=t0, end=t1, status="canceled")
    assert deliver(shop, "customer.subscription.deleted", gone, at=end) == "subscription_canceled"
    assert current_subscription(shop.db, user_id=sub.user_id) is None
    # A late "updated" cannot bring it back.
    revived = subscription(sub, price="price_team", start=t0, end=t1)
    assert deliver(shop, "customer.subscription.updated", revived, at=end) == (
        "stale_subscription_event"
    )
    report = ledger.expire_due_grants(shop.db, now=end)
    assert report.credits_expired == TEAM
    assert ledger.get_balance(shop.db, user_id=sub.user_id).balance == 1_000
    assert verify_ledger(shop.db) == []


# --- trust --------------------------------------------------------------------------------------


def test_events_about_subscriptions_the_app_did_not_make_grant_nothing(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    sub = subscribe(shop, stripe_server[0])
    t0 = int(time.time())
    t1 = t0 + 30 * DAY
    now = at(t0 + 1)
    strangers = [
        # Another customer (made at Stripe some other way), with our user's marker.
        Subscriber(sub.user_id, "cus_elsewhere", sub.metadata, "sub_x1"),
        # Our user's customer, with no marker (a subscription made in the dashboard) ...
        Subscriber(sub.user_id, sub.customer_id, {"user_id": str(sub.user_id)}, "sub_x2"),
        # ... or a forged one.
        Subscriber(
            sub.user_id,
            sub.customer_id,
            {"aicredits_ref": sub.metadata["aicredits_ref"][:-4] + "0000"},
            "sub_x3",
        ),
    ]
    for n, stranger in enumerate(strangers):
        obj = subscription(stranger, price="price_pro", start=t0, end=t1)
        assert deliver(shop, "customer.subscription.created", obj, at=now) == (
            "unknown_subscription"
        )
        bill = invoice(stranger, f"in_x{n}", [line("price_pro", 5_000, t0, t1)])
        assert deliver(shop, "invoice.paid", bill, at=now) == "unknown_subscription"
    # Ours, but a price that is no plan of ours: the metadata's plan counts for nothing.
    mine = Subscriber(sub.user_id, sub.customer_id, {**sub.metadata, "plan_id": "pro"}, "sub_y")
    obj = subscription(mine, price="price_other", start=t0, end=t1)
    assert deliver(shop, "customer.subscription.created", obj, at=now) == "unknown_plan"
    bill = invoice(mine, "in_y", [line("price_other", 9_999, t0, t1)])
    assert deliver(shop, "invoice.paid", bill, at=now) == "unknown_plan"
    assert ledger.get_balance(shop.db, user_id=sub.user_id).balance == 1_000
    with shop.db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(subscriptions)).scalar() == 0
    assert verify_ledger(shop.db) == []


# --- the simulated subscription, over real HTTP ------------------------------------------------


@pytest.fixture
def simulated(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Shop, str]]:
    """The app on a real port with no Stripe key: each button posts to its own webhook."""
    shop = make_shop(db, monkeypatch)
    with serve_asgi(shop.client.app, ready_path="/healthz") as base:
        monkeypatch.setenv("API_URL", base)
        get_settings.cache_clear()
        shop.settings = get_settings()
        yield shop, base
    get_settings.cache_clear()


def test_the_simulated_subscription_portal_and_next_month(simulated: tuple[Shop, str]) -> None:
    shop, base = simulated
    uid = make_user(shop.db, credits=1_000)
    client = httpx.Client(base_url=base, headers=shop.session_cookie(uid), timeout=30)
    start = client.post("/billing/subscribe", data={"plan": "team"})
    assert start.status_code == 303, start.text
    assert start.headers["location"] == f"{base}/billing/simulated/subscribe/team"
    page = client.get(start.headers["location"])
    assert "SIMULATED BILLING" in page.text and "20.00 USD" in page.text
    done = client.post(start.headers["location"])
    assert done.status_code == 303, done.text
    assert done.headers["location"] == f"{PUBLIC}/credits"
    assert ledger.get_balance(shop.db, user_id=uid).balance == 1_000 + TEAM
    spend(shop.db, uid, 4_000, datetime.now(UTC))

    portal = client.post("/billing/portal")
    assert portal.headers["location"] == f"{base}/billing/simulated/portal"
    page = client.get("/billing/simulated/portal")
    assert "SIMULATED BILLING" in page.text and "Simulate next month" in page.text

    assert client.post("/billing/simulated/next-month").status_code == 303
    # The old period's rest expired; the new period's allowance is whole.
    assert entries(shop.db, uid, "expiry") == [-(TEAM - 4_000)]
    assert ledger.get_balance(shop.db, user_id=uid).balance == 1_000 + TEAM
    usage = plan_usage(shop.db, shop.settings, user_id=uid)
    assert usage is not None and (usage.used, usage.remaining) == (0, TEAM)

    assert client.post("/billing/simulated/change", data={"plan": "pro"}).status_code == 303
    usage = plan_usage(shop.db, shop.settings, user_id=uid)
    assert usage is not None and usage.plan == "Pro" and usage.included > TEAM

    assert client.post("/billing/simulated/cancel").status_code == 303
    assert client.post("/billing/simulated/next-month").status_code == 303
    assert current_subscription(shop.db, user_id=uid) is None
    assert len(list_invoices(shop.db, shop.settings, user_id=uid)) == 3
    assert verify_ledger(shop.db) == []


# --- metered overage ----------------------------------------------------------------------------


@pytest.fixture
def metered(
    db: Database, monkeypatch: pytest.MonkeyPatch, stripe_server: tuple[FakeStripe, str]
) -> Iterator[Shop]:
    stripe_server[0].requests.clear()
    plans = [
        {
            "id": "team",
            "included_credits": TEAM,
            "price_id": "price_team",
            "overage": "metered",
            "metered_ceiling_credits": CEILING,
            "overage_price_id": "price_overage",
        }
    ]
    yield make_shop(
        db,
        monkeypatch,
        STRIPE_SECRET_KEY="sk_test_fake",
        STRIPE_API_BASE=stripe_server[1],
        PLANS=json.dumps(plans),
    )
    get_settings.cache_clear()


CEILING = 10_000


def test_metered_overage_never_passes_the_ceiling_and_is_reported_once_per_period(
    metered: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    shop, fake = metered, stripe_server[0]
    sub, t0, t1 = started(shop, fake)
    uid = sub.user_id
    # The period's allowance, the credit line (the ceiling), and the trial grant.
    assert ledger.get_balance(shop.db, user_id=uid).balance == TEAM + CEILING + 1_000
    spend(shop.db, uid, TEAM + 4_000, at(t0 + 600))  # the allowance, then 4,000 of the line
    with pytest.raises(InsufficientCredits):  # never past the ceiling (and the trial's 1,000)
        spend(shop.db, uid, CEILING, at(t0 + 700))
    usage = plan_usage(shop.db, shop.settings, user_id=uid)
    assert usage is not None
    assert (usage.used, usage.overage_used, usage.overage_ceiling) == (TEAM, 4_000, CEILING)
    assert overage.report_due(shop.db, shop.settings, now=at(t0 + 800)) == 0  # not over yet

    end = at(t1 + 60)
    jobs.run_all(shop.db, shop.settings, now=end)  # expires the rest, then reports
    jobs.run_all(shop.db, shop.settings, now=end + timedelta(minutes=5))  # changes nothing
    [item] = fake.calls("POST", "/v1/invoiceitems")
    assert item.params["customer"] == sub.customer_id
    assert item.params["subscription"] == sub.subscription_id
    assert item.params["pricing"] == {"price": "price_overage"}
    assert item.params["quantity"] == "4000"
    assert item.headers["idempotency-key"] == "aicredits-overage-in_first"
    with shop.db.read() as conn:
        row = conn.execute(sa.select(invoices).where(invoices.c.invoice_id == "in_first")).one()
    assert row.overage_credits == 4_000
    assert row.overage_item_id is not None and row.overage_item_id.startswith("ii_fake_")
    # The line's unused 6,000 and nothing of the allowance expired; the trial grant stays.
    assert entries(shop.db, uid, "expiry") == [-(CEILING - 4_000)]
    assert ledger.get_balance(shop.db, user_id=uid).balance == 1_000
    assert verify_ledger(shop.db) == []


def test_a_renewal_opens_a_new_credit_line_and_closes_the_old_one(
    metered: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    shop = metered
    sub, _, t1 = started(shop, stripe_server[0])
    t2 = t1 + 30 * DAY
    later = at(t1 + 600)
    deliver(
        shop,
        "customer.subscription.updated",
        subscription(sub, price="price_team", start=t1, end=t2),
        at=later,
    )
    cycle = invoice(sub, "in_second", [line("price_team", 2_000, t1, t2)])
    assert deliver(shop, "invoice.paid", cycle, at=later) == "granted"
    # The first period's allowance and line expired whole; the second period's are granted.
    assert sorted(entries(shop.db, sub.user_id, "expiry")) == [-TEAM, -CEILING]
    assert ledger.get_balance(shop.db, user_id=sub.user_id).balance == TEAM + CEILING + 1_000
    assert overage.report_due(shop.db, shop.settings, now=later) == 1  # nothing used: no item
    assert stripe_server[0].calls("POST", "/v1/invoiceitems") == []
    assert verify_ledger(shop.db) == []


# --- email receipts -------------------------------------------------------------------------------


def test_each_purchase_and_invoice_gets_one_email_receipt_and_failures_are_retried(
    db: Database, monkeypatch: pytest.MonkeyPatch, stripe_server: tuple[FakeStripe, str]
) -> None:
    fake = stripe_server[0]
    with smtp_sink() as sink:
        shop = make_shop(
            db,
            monkeypatch,
            STRIPE_SECRET_KEY="sk_test_fake",
            STRIPE_API_BASE=stripe_server[1],
            PLANS=PLANS,
            SMTP_HOST=sink.host,
            SMTP_PORT=str(sink.port),
            SMTP_FROM="billing@example.test",
            SMTP_STARTTLS="false",
        )
        sub, t0, _ = started(shop, fake)
        url = checkout.start_checkout(
            shop.db, shop.settings, user_id=sub.user_id, pack_id="starter"
        )
        sid = url.rsplit("/", 1)[-1]
        completed = fs.event("checkout.session.completed", fake.pay(sid))
        assert shop.deliver(completed).json()["outcome"] == "credited"
        assert shop.deliver(completed).json()["outcome"] == "credited"  # a replay
        first = invoice(sub, "in_first", [line("price_team", 2_000, t0, t0 + 30 * DAY)])
        assert deliver(shop, "invoice.paid", first, at=at(t0 + 120)) == "already_granted"

        sink.refuse = True
        assert receipts.send_due_emails(shop.db, shop.settings) == 0
        sink.refuse = False
        assert receipts.send_due_emails(shop.db, shop.settings) == 0  # backing off
        later = datetime.now(UTC) + timedelta(minutes=5)
        assert receipts.send_due_emails(shop.db, shop.settings, now=later) == 2
        assert receipts.send_due_emails(shop.db, shop.settings, now=later) == 0
    assert len(sink.messages) == 2
    bodies = "\n".join(sink.messages)
    assert "Your aicredits receipt" in bodies and "5,000 credits" in bodies
    assert "Your aicredits invoice" in bodies
    assert "https://invoice.stripe.test/i/in_first" in bodies
    get_settings.cache_clear()


def test_there_is_no_simulated_billing_with_real_stripe(
    shop: Shop, stripe_server: tuple[FakeStripe, str]
) -> None:
    sub, _, _ = started(shop, stripe_server[0])
    cookie = shop.session_cookie(sub.user_id)
    assert shop.client.get("/billing/simulated/portal", headers=cookie).status_code == 503
    assert shop.client.get("/billing/simulated/subscribe/team", headers=cookie).status_code == 503
    for action in ("subscribe/team", "next-month", "cancel", "change"):
        response = shop.client.post(f"/billing/simulated/{action}", headers=cookie)
        assert response.status_code == 503, action
    assert ledger.get_balance(shop.db, user_id=sub.user_id).balance == 1_000 + TEAM
    # Nor does a simulated price id count for anything here.
    t0 = int(time.time())
    fake_sim = invoice(sub, "in_sim_x", [line("price_sim_team", 0, t0, t0 + 30 * DAY)])
    assert deliver(shop, "invoice.paid", fake_sim, at=at(t0 + 1)) == "unknown_plan"


def test_a_plan_made_through_stripe_is_not_sent_to_the_simulated_portal_without_a_key(
    shop: Shop, stripe_server: tuple[FakeStripe, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan made through Stripe, then the key removed (development): "Manage billing"
    says what to do instead of opening the simulated portal, which could not change the
    plan and would say there is none."""
    sub, _, _ = started(shop, stripe_server[0])
    without_key = make_shop(shop.db, monkeypatch, PLANS=PLANS)
    cookie = without_key.session_cookie(sub.user_id)
    page = without_key.client.post("/billing/portal", headers=cookie)
    assert page.status_code >= 400 and "STRIPE_SECRET_KEY is not set" in page.text
    assert "/billing/simulated" not in page.headers.get("location", "")
    usage = plan_usage(without_key.db, without_key.settings, user_id=sub.user_id)
    assert usage is not None and usage.plan == "Team"  # still the user's plan
    get_settings.cache_clear()
