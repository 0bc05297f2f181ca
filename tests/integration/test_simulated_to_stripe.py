"""A development database first used with the simulated checkout, then given a Stripe key (the
way a newcomer goes: `make run`, then Stripe's test keys), on SQLite and Postgres.

What the simulated payments left (a `cus_sim_` customer, a simulated plan, a simulated saved
card and a top-up in flight on it) is not Stripe's, and the fake answers those ids as Stripe
does ("No such customer"). So: buying and subscribing make a real customer and use it, the
simulated plan no longer blocks a real one or speaks for the user, "Manage billing" explains
instead of failing at Stripe, and auto top-up forgets the simulated card with a notice instead
of retrying a charge that can never happen. Nothing is charged twice and verify-ledger stays
clean."""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import auto_topup_settings, auto_topups, stripe_customers, utcnow
from aicredits.domain.auto_topup import SIMULATED_CARD, SIMULATED_CARD_NOTICE, InvalidAutoTopUp
from aicredits.services import auto_topup, checkout, ledger, thresholds
from aicredits.services.plans import current_subscription
from aicredits.services.subscriptions import billing_page, plan_usage
from aicredits.services.verify import verify_ledger
from aicredits.settings import Settings, get_settings
from tests.factories import make_user, new_key
from tests.integration import fake_stripe as fs
from tests.integration.fake_stripe import FakeStripe, Shop, make_shop
from tests.integration.test_concurrency import run_together
from tests.servers import serve_asgi

TEAM = 25_000
PLANS = json.dumps(
    [
        {
            "id": "team",
            "label": "Team",
            "included_credits": TEAM,
            "price_id": "price_team",
            "amount": 2_000,
            "currency": "usd",
        }
    ]
)


@pytest.fixture(scope="module")
def stripe_server() -> Iterator[tuple[FakeStripe, str]]:
    fake = FakeStripe(prices={"price_team": (2_000, "usd")})
    with serve_asgi(fake.app, ready_path="/health") as base:
        yield fake, base


@pytest.fixture
def fake(stripe_server: tuple[FakeStripe, str]) -> FakeStripe:
    stripe_server[0].requests.clear()
    stripe_server[0].charge_outcomes.clear()
    return stripe_server[0]


@pytest.fixture
def simulated_first(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Shop]]:
    """A user who, with no Stripe key, subscribed to a plan (over real HTTP: the simulated
    billing posts its events to the app's webhook) and saved a simulated card for auto
    top-up, which they turned on."""
    shop = make_shop(db, monkeypatch, PLANS=PLANS)
    uid = make_user(db, credits=1_000)
    with serve_asgi(shop.client.app, ready_path="/healthz") as base:
        monkeypatch.setenv("API_URL", base)
        get_settings.cache_clear()
        settings = get_settings()
        client = httpx.Client(base_url=base, headers=shop.session_cookie(uid), timeout=30)
        start = client.post("/billing/subscribe", data={"plan": "team"})
        assert start.status_code == 303, start.text
        assert client.post(start.headers["location"]).status_code == 303
        auto_topup.start_card_setup(db, settings, user_id=uid)
        turn_on(db, settings, uid)
    sub = current_subscription(db, user_id=uid)
    assert sub is not None and sub.simulated
    assert customer_of(db, uid).startswith("cus_sim_")
    assert auto_topup.view(db, settings, user_id=uid).card_simulated
    get_settings.cache_clear()
    yield uid, shop


@pytest.fixture
def with_stripe(
    simulated_first: tuple[int, Shop],
    monkeypatch: pytest.MonkeyPatch,
    stripe_server: tuple[FakeStripe, str],
) -> Iterator[tuple[int, Shop]]:
    """The same database, the app restarted with a Stripe key."""
    uid, first = simulated_first
    shop = make_shop(
        first.db,
        monkeypatch,
        STRIPE_SECRET_KEY="sk_test_fake",
        STRIPE_API_BASE=stripe_server[1],
        PLANS=PLANS,
    )
    yield uid, shop
    get_settings.cache_clear()


def customer_of(db: Database, uid: int) -> str:
    with db.read() as conn:
        return str(
            conn.execute(
                sa.select(stripe_customers.c.customer_id).where(stripe_customers.c.user_id == uid)
            ).scalar_one()
        )


def test_buying_makes_a_real_customer_in_place_of_the_simulated_one(
    with_stripe: tuple[int, Shop], fake: FakeStripe
) -> None:
    uid, shop = with_stripe
    first = shop.client.post(
        "/checkout/start", data={"pack": "starter"}, headers=shop.session_cookie(uid)
    )
    assert first.status_code == 303, first.text
    assert urlsplit(first.headers["location"]).hostname == "checkout.stripe.test"
    (made,) = fake.calls("POST", "/v1/customers")
    assert made.params["metadata"] == {"user_id": str(uid)}
    (session,) = fake.calls("POST", "/v1/checkout/sessions")
    real = session.params["customer"]
    assert real.startswith("cus_fake_") and customer_of(shop.db, uid) == real

    again = shop.client.post(
        "/checkout/start", data={"pack": "starter"}, headers=shop.session_cookie(uid)
    )
    assert again.status_code == 303, again.text
    assert len(fake.calls("POST", "/v1/customers")) == 1  # made once, then reused
    assert fake.calls("POST", "/v1/checkout/sessions")[-1].params["customer"] == real
    assert verify_ledger(shop.db) == []


def test_first_checkouts_racing_agree_on_one_customer(
    with_stripe: tuple[int, Shop], fake: FakeStripe
) -> None:
    uid, shop = with_stripe
    results = run_together(
        [
            lambda: checkout.start_checkout(shop.db, shop.settings, user_id=uid, pack_id="starter")
            for _ in range(8)
        ]
    )
    assert all(isinstance(r, str) for r in results), results
    sessions = fake.calls("POST", "/v1/checkout/sessions")
    assert len(sessions) == 8
    # Each made a customer at Stripe if it saw the simulated one; one was kept, all use it.
    assert {s.params["customer"] for s in sessions} == {customer_of(shop.db, uid)}
    assert customer_of(shop.db, uid).startswith("cus_fake_")


def test_the_simulated_plan_gives_way_to_a_real_one(
    with_stripe: tuple[int, Shop], fake: FakeStripe
) -> None:
    uid, shop = with_stripe
    cookie = shop.session_cookie(uid)
    # It is not the user's plan any more: not on the credits page, not in their errors.
    assert plan_usage(shop.db, shop.settings, user_id=uid) is None
    assert billing_page(shop.db, shop.settings, user_id=uid).usage is None
    # "Manage billing" says why there is nothing to manage, instead of Stripe's error.
    portal = shop.client.post("/billing/portal", headers=cookie)
    assert portal.status_code == 400, portal.text
    assert "subscribe to a plan first" in portal.text
    assert "No such customer" not in portal.text
    assert fake.calls("POST", "/v1/billing_portal/sessions") == []

    start = shop.client.post("/billing/subscribe", data={"plan": "team"}, headers=cookie)
    assert start.status_code == 303, start.text
    (session,) = fake.calls("POST", "/v1/checkout/sessions")
    assert session.params["mode"] == "subscription"
    assert session.params["customer"] == customer_of(shop.db, uid)
    assert session.params["customer"].startswith("cus_fake_")
    # The simulated plan's credits stay until its period ends.
    assert ledger.get_balance(shop.db, user_id=uid).balance == 1_000 + TEAM
    assert verify_ledger(shop.db) == []


def test_auto_top_up_forgets_the_simulated_card_and_charges_nothing(
    with_stripe: tuple[int, Shop], fake: FakeStripe
) -> None:
    uid, shop = with_stripe
    shown = auto_topup.view(shop.db, shop.settings, user_id=uid)
    assert (shown.has_card, shown.enabled, shown.card_last4) == (False, False, "")
    assert shown.notice == SIMULATED_CARD_NOTICE
    assert (shown.threshold, shown.pack_id) == (500, "starter")  # the choices are kept

    spend_all_but(shop.db, uid, 100)
    assert auto_topup.run_due(shop.db, shop.settings) == 0
    assert fake.calls("POST", "/v1/payment_intents") == []
    row = settings_row(shop.db, uid)
    assert (row.enabled, row.payment_method_id, row.card_simulated) == (False, None, False)
    assert row.notice == SIMULATED_CARD_NOTICE
    # Turning it on again asks for a card, which is now saved through Stripe.
    with pytest.raises(InvalidAutoTopUp, match="Save a card first"):
        turn_on(shop.db, shop.settings, uid)
    assert ledger.get_balance(shop.db, user_id=uid).available == 100
    assert verify_ledger(shop.db) == []


def test_the_job_forgets_the_simulated_card_of_a_user_with_plenty_left(
    with_stripe: tuple[int, Shop], fake: FakeStripe
) -> None:
    uid, shop = with_stripe
    assert thresholds.status(shop.db, shop.settings, user_id=uid).topup is None
    assert auto_topup.run_due(shop.db, shop.settings) == 0
    row = settings_row(shop.db, uid)
    assert (row.enabled, row.payment_method_id, row.card_simulated) == (False, None, False)
    # Told on every page (the banner beside the usage warning), not only on /credits.
    notice = thresholds.status(shop.db, shop.settings, user_id=uid).topup
    assert notice is not None and notice.text == SIMULATED_CARD_NOTICE
    assert fake.calls("POST", "/v1/payment_intents") == []


def test_a_top_up_in_flight_on_the_simulated_card_fails_without_a_charge(
    with_stripe: tuple[int, Shop], fake: FakeStripe
) -> None:
    uid, shop = with_stripe
    # What a worker stopped between starting a simulated top-up and its answer leaves.
    spend_all_but(shop.db, uid, 100)
    with shop.db.transaction() as conn:
        row = conn.execute(
            sa.select(auto_topup_settings).where(auto_topup_settings.c.user_id == uid)
        ).one()
        started = auto_topup._insert_topup(
            conn, shop.db, shop.settings, row, shop.settings.packs[0], "cus_sim_x", utcnow()
        )
    assert started.simulated

    auto_topup.run_due(shop.db, shop.settings)
    with shop.db.read() as conn:
        topup = conn.execute(sa.select(auto_topups).where(auto_topups.c.id == started.id)).one()
    assert (topup.status, topup.failure_code) == ("failed", SIMULATED_CARD)
    assert fake.calls("POST", "/v1/payment_intents") == []
    assert settings_row(shop.db, uid).payment_method_id is None
    assert ledger.get_balance(shop.db, user_id=uid).available == 100
    assert verify_ledger(shop.db) == []


def turn_on(db: Database, settings: Settings, uid: int) -> None:
    """Auto top-up on: below 500 credits, buy the starter pack."""
    auto_topup.save_settings(
        db, settings, user_id=uid, enabled=True, threshold=500, pack_id="starter", monthly_cap=4
    )


def spend_all_but(db: Database, uid: int, left: int) -> None:
    available = ledger.get_balance(db, user_id=uid).available
    hold = ledger.reserve(db, user_id=uid, credits=available - left, request_id=new_key("req"))
    ledger.settle(db, hold=hold, actual_credits=available - left)


def settings_row(db: Database, uid: int) -> sa.Row[tuple[object, ...]]:
    with db.read() as conn:
        return conn.execute(
            sa.select(auto_topup_settings).where(auto_topup_settings.c.user_id == uid)
        ).one()


def low_with_a_card_saved_through_stripe(
    db: Database, monkeypatch: pytest.MonkeyPatch, stripe_server: tuple[FakeStripe, str]
) -> tuple[Shop, FakeStripe, int]:
    """A user, with a Stripe key set, who saved a card through Stripe, turned auto top-up on
    and has 100 credits left (below the threshold)."""
    shop = make_shop(
        db, monkeypatch, STRIPE_SECRET_KEY="sk_test_fake", STRIPE_API_BASE=stripe_server[1]
    )
    fake = stripe_server[0]
    fake.requests.clear()
    uid = make_user(db, credits=1_000)
    url = auto_topup.start_card_setup(db, shop.settings, user_id=uid)
    completed = fake.complete_setup(url.rsplit("/", 1)[-1])
    assert shop.deliver(fs.event("checkout.session.completed", completed)).status_code == 200
    turn_on(db, shop.settings, uid)
    spend_all_but(db, uid, 100)
    return shop, fake, uid


def test_without_a_stripe_key_a_card_saved_through_stripe_starts_no_top_up(
    db: Database, monkeypatch: pytest.MonkeyPatch, stripe_server: tuple[FakeStripe, str]
) -> None:
    """The other way: a card saved through Stripe, then the key removed (development). No
    top-up starts, so none is charged later, when a key comes back, for today's balance."""
    _, _, uid = low_with_a_card_saved_through_stripe(db, monkeypatch, stripe_server)

    without_key = make_shop(db, monkeypatch)
    assert auto_topup.run_due(db, without_key.settings) == 0
    with db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(auto_topups)).scalar() == 0
    row = settings_row(db, uid)
    assert row.enabled and row.payment_method_id is not None  # kept for when the key is back
    get_settings.cache_clear()


def test_a_top_up_in_flight_through_stripe_waits_quietly_for_the_key(
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    stripe_server: tuple[FakeStripe, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A top-up started through Stripe, the worker stopped before Stripe's answer, then the
    key removed (development). Stripe may have charged it, so it is neither failed nor
    charged again: it waits, said once in the log (not every 5 s), and is finished once the
    key is back, with the same idempotency key."""
    shop, fake, uid = low_with_a_card_saved_through_stripe(db, monkeypatch, stripe_server)
    with db.transaction() as conn:
        row = conn.execute(
            sa.select(auto_topup_settings).where(auto_topup_settings.c.user_id == uid)
        ).one()
        started = auto_topup._insert_topup(
            conn, db, shop.settings, row, shop.settings.packs[0], customer_of(db, uid), utcnow()
        )
    assert not started.simulated

    without_key = make_shop(db, monkeypatch)
    caplog.set_level("WARNING", logger="aicredits.services.auto_topup")
    for _ in range(3):
        auto_topup.run_due(db, without_key.settings)
    said = [r.getMessage() for r in caplog.records if r.name == "aicredits.services.auto_topup"]
    assert len(said) == 1 and "STRIPE_SECRET_KEY is not set" in said[0], said
    with db.read() as conn:
        topup = conn.execute(sa.select(auto_topups).where(auto_topups.c.id == started.id)).one()
    assert topup.status == "processing"
    assert fake.calls("POST", "/v1/payment_intents") == []

    back = make_shop(
        db, monkeypatch, STRIPE_SECRET_KEY="sk_test_fake", STRIPE_API_BASE=stripe_server[1]
    )
    auto_topup.run_due(db, back.settings)
    with db.read() as conn:
        topup = conn.execute(sa.select(auto_topups).where(auto_topups.c.id == started.id)).one()
    assert topup.status == "succeeded", topup
    assert len(fake.calls("POST", "/v1/payment_intents")) == 1
    assert ledger.get_balance(db, user_id=uid).available == 100 + started.credits
    assert verify_ledger(db) == []
    get_settings.cache_clear()
