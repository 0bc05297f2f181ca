"""Starting a checkout and coming back from it, on SQLite and Postgres: the real Stripe SDK
against a local fake Stripe server (what it is sent, the idempotency key, the customer made
once), the success page fulfilling through the webhook's function, and the simulated
checkout end to end over HTTP."""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa

from aicredits.adapters import stripe_api
from aicredits.adapters.db import Database
from aicredits.adapters.tables import ledger_entries, purchases, stripe_customers, stripe_events
from aicredits.domain import checkout_marker
from aicredits.services import checkout, packs, payment_trust, stripe_config, stripe_webhook
from aicredits.services.fulfilment import FulfilmentStatus
from aicredits.services.payment_errors import PaymentsUnavailable, UnknownCheckoutSession
from aicredits.services.purchases import list_purchases
from aicredits.services.verify import verify_ledger
from aicredits.settings import Settings, get_settings
from tests.factories import make_user
from tests.integration import fake_stripe as fs
from tests.integration.fake_stripe import PUBLIC, FakeStripe, Shop, make_shop
from tests.servers import serve_asgi

STARTER = 5_000


@pytest.fixture(scope="module")
def stripe_server() -> Iterator[tuple[FakeStripe, str]]:
    fake = FakeStripe(prices={"price_plus": (2_000, "usd")})
    with serve_asgi(fake.app, ready_path="/health") as base:
        yield fake, base


@pytest.fixture
def fake(stripe_server: tuple[FakeStripe, str]) -> FakeStripe:
    stripe_server[0].requests.clear()
    stripe_server[0].refuse_sessions = False
    return stripe_server[0]


@pytest.fixture
def shop(
    db: Database, monkeypatch: pytest.MonkeyPatch, stripe_server: tuple[FakeStripe, str]
) -> Iterator[Shop]:
    """Real Stripe mode, the SDK pointed at the fake."""
    yield make_shop(
        db,
        monkeypatch,
        STRIPE_SECRET_KEY="sk_test_fake",
        STRIPE_API_BASE=stripe_server[1],
        PACKS=(
            '[{"id": "starter", "label": "Starter", "credits": 5000, "amount": 500, '
            '"currency": "usd"}, {"id": "plus", "credits": 22000, "price_id": "price_plus"}]'
        ),
    )
    get_settings.cache_clear()


def buy(shop: Shop, user_id: int, pack: str = "starter", **headers: str) -> Any:
    return shop.client.post(
        "/checkout/start", data={"pack": pack}, headers={**shop.session_cookie(user_id), **headers}
    )


def count(db: Database, table: sa.Table, *where: Any) -> int:
    with db.read() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
        )


# --- creating the session ------------------------------------------------------------------------


def test_buy_creates_a_checkout_session_with_the_packs_terms(shop: Shop, fake: FakeStripe) -> None:
    uid = make_user(shop.db, email="ada@example.test")
    response = buy(shop, uid)
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert location.startswith("https://checkout.stripe.test/c/pay/cs_test_fake")

    (call,) = fake.calls("POST", "/v1/checkout/sessions")
    sent = call.params
    marker = sent["metadata"]["aicredits_ref"]
    meta = {
        "user_id": str(uid),
        "pack_id": "starter",
        "credits": "5000",
        "aicredits_ref": marker,
    }
    assert sent["mode"] == "payment"
    assert sent["client_reference_id"] == str(uid)
    assert sent["metadata"] == meta
    # The app's keyed marker: it vouches for this user and pack, and only the app can make it.
    claims = checkout_marker.read_marker(payment_trust.marker_key(shop.settings), marker)
    assert claims is not None and (claims.user_id, claims.pack_id) == (uid, "starter")
    assert sent["payment_intent_data"] == {"metadata": meta}
    assert sent["line_items"] == [
        {
            "price_data": {
                "currency": "usd",
                "unit_amount": "500",
                "product_data": {"name": "Starter: 5,000 credits"},
            },
            "quantity": "1",
        }
    ]
    assert sent["success_url"] == f"{PUBLIC}/credits/success?session_id={{CHECKOUT_SESSION_ID}}"
    assert sent["cancel_url"] == f"{PUBLIC}/credits/cancel"
    (customer,) = fake.calls("POST", "/v1/customers")
    assert customer.params["email"] == "ada@example.test"
    assert customer.params["metadata"] == {"user_id": str(uid)}
    assert sent["customer"].startswith("cus_fake_")
    assert call.headers["idempotency-key"].startswith(f"aicredits-checkout-{uid}-")

    sid = urlsplit(location).path.rsplit("/", 1)[-1]
    purchase = shop.purchase(sid)
    assert (purchase.user_id, purchase.pack_id, purchase.credits) == (uid, "starter", STARTER)
    assert (purchase.amount, purchase.currency, purchase.status) == (500, "usd", "open")
    assert not purchase.simulated
    assert verify_ledger(shop.db) == []


def test_the_customer_is_created_once_and_reused_with_a_new_key_per_attempt(
    shop: Shop, fake: FakeStripe
) -> None:
    uid = make_user(shop.db)
    first, second = buy(shop, uid), buy(shop, uid)
    assert first.status_code == second.status_code == 303
    assert first.headers["location"] != second.headers["location"]
    assert len(fake.calls("POST", "/v1/customers")) == 1
    sessions = fake.calls("POST", "/v1/checkout/sessions")
    assert len({s.params["customer"] for s in sessions}) == 1
    assert len({s.headers["idempotency-key"] for s in sessions}) == 2
    assert count(shop.db, stripe_customers) == 1
    assert count(shop.db, purchases) == 2


def test_a_pack_priced_by_a_stripe_price_sends_the_price_id(shop: Shop, fake: FakeStripe) -> None:
    uid = make_user(shop.db)
    response = buy(shop, uid, pack="plus")
    assert response.status_code == 303
    (call,) = fake.calls("POST", "/v1/checkout/sessions")
    assert call.params["line_items"] == [{"price": "price_plus", "quantity": "1"}]
    sid = urlsplit(response.headers["location"]).path.rsplit("/", 1)[-1]
    assert (shop.purchase(sid).amount, shop.purchase(sid).credits) == (2_000, 22_000)


def test_an_unknown_pack_is_refused_with_a_clear_message_and_no_stripe_call(
    shop: Shop, fake: FakeStripe
) -> None:
    uid = make_user(shop.db)
    response = buy(shop, uid, pack="gold")
    assert response.status_code == 400
    assert "There is no credit pack called &#x27;gold&#x27;" in response.text
    assert fake.requests == []
    assert count(shop.db, purchases) == 0


def test_stripe_refusing_the_session_shows_an_error_and_stores_nothing(
    shop: Shop, fake: FakeStripe
) -> None:
    fake.refuse_sessions = True
    response = buy(shop, make_user(shop.db))
    assert response.status_code == 502
    assert "Stripe could not start the checkout" in response.text
    assert count(shop.db, purchases) == 0


def test_buy_signed_out_is_sent_to_sign_in_and_back(shop: Shop, fake: FakeStripe) -> None:
    response = shop.client.post(
        "/checkout/start", data={"pack": "starter"}, headers={"Origin": PUBLIC}
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"{PUBLIC}/login?next=/credits"
    assert fake.requests == []


def test_buy_from_another_site_is_refused(shop: Shop, fake: FakeStripe) -> None:
    response = buy(shop, make_user(shop.db), Origin="https://evil.example")
    assert response.status_code == 403
    assert fake.requests == []
    assert count(shop.db, purchases) == 0


# --- coming back: the success page -----------------------------------------------------------


def _bought(shop: Shop, uid: int) -> str:
    response = buy(shop, uid)
    assert response.status_code == 303
    return urlsplit(response.headers["location"]).path.rsplit("/", 1)[-1]


def test_the_success_page_credits_a_paid_session_it_reads_back_from_stripe(
    shop: Shop, fake: FakeStripe
) -> None:
    uid = make_user(shop.db)
    sid = _bought(shop, uid)
    session = fake.pay(sid)
    result = checkout.confirm_checkout(shop.db, shop.settings, user_id=uid, session_id=sid)
    assert (result.status, result.credits, result.newly_credited) == (
        FulfilmentStatus.CREDITED,
        STARTER,
        True,
    )
    (retrieve,) = fake.calls("GET", f"/v1/checkout/sessions/{sid}")
    assert retrieve.params["expand"] == ["payment_intent.latest_charge"]
    purchase = shop.purchase(sid)
    assert purchase.receipt_url == f"https://pay.stripe.test/receipts/{fake.charge_of(sid)}"
    assert purchase.payment_intent_id == session["payment_intent"]
    # The webhook arriving afterwards finds it done; so does a reload of the page.
    late = shop.deliver(fs.event("checkout.session.completed", session))
    assert late.json()["outcome"] == "already_credited"
    again = checkout.confirm_checkout(shop.db, shop.settings, user_id=uid, session_id=sid)
    assert (again.status, again.newly_credited) == (FulfilmentStatus.CREDITED, False)
    assert shop.balance(uid) == STARTER
    assert verify_ledger(shop.db) == []


def test_the_success_page_says_processing_while_the_payment_clears(
    shop: Shop, fake: FakeStripe
) -> None:
    uid = make_user(shop.db)
    sid = _bought(shop, uid)
    fake.pay(sid, paid=False)
    result = checkout.confirm_checkout(shop.db, shop.settings, user_id=uid, session_id=sid)
    assert result.status == FulfilmentStatus.PROCESSING
    assert shop.balance(uid) == 0
    assert shop.purchase(sid).status == "pending"


@pytest.mark.parametrize("whose", ["someone else's", "made up", "not an id"])
def test_the_success_page_refuses_a_session_that_is_not_the_users(
    shop: Shop, fake: FakeStripe, whose: str
) -> None:
    owner, other = make_user(shop.db), make_user(shop.db)
    sid = _bought(shop, owner)
    fake.pay(sid)
    wanted = {"someone else's": sid, "made up": "cs_test_nope", "not an id": "../../v1/x"}[whose]
    with pytest.raises(UnknownCheckoutSession):
        checkout.confirm_checkout(shop.db, shop.settings, user_id=other, session_id=wanted)
    assert shop.balance(owner) == shop.balance(other) == 0
    assert count(shop.db, ledger_entries) == 0


def test_the_completion_and_the_success_page_racing_credit_once(
    shop: Shop, fake: FakeStripe
) -> None:
    uid = make_user(shop.db)
    sid = _bought(shop, uid)
    session = fake.pay(sid)
    body = fs.event("checkout.session.completed", session)
    gate = threading.Barrier(8)
    errors: list[BaseException] = []

    def page() -> None:
        gate.wait()
        try:
            checkout.confirm_checkout(shop.db, shop.settings, user_id=uid, session_id=sid)
        except BaseException as exc:
            errors.append(exc)

    def hook() -> None:
        gate.wait()
        try:
            stripe_webhook.handle_webhook(
                shop.db, shop.settings, payload=body.encode(), signature=fs.sign(body, shop.secret)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in [page, hook] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert shop.balance(uid) == STARTER
    assert count(shop.db, ledger_entries, ledger_entries.c.kind == "purchase") == 1
    assert count(shop.db, stripe_events) == 1
    assert verify_ledger(shop.db) == []


# --- the simulated checkout, over real HTTP ---------------------------------------------------


@pytest.fixture
def simulated(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Shop, str]]:
    """The app served on a real port with no Stripe key: "Pay" posts to its own webhook."""
    shop = make_shop(db, monkeypatch)
    with serve_asgi(shop.client.app, ready_path="/healthz") as base:
        monkeypatch.setenv("API_URL", base)
        get_settings.cache_clear()
        shop.settings = get_settings()
        yield shop, base
    get_settings.cache_clear()


def _simulated_buy(shop: Shop, base: str, uid: int) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=base, headers=shop.session_cookie(uid), timeout=30)
    response = client.post("/checkout/start", data={"pack": "starter"})
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert location.startswith(f"{base}/checkout/simulated/cs_test_sim_")
    page = client.get(location)
    assert page.status_code == 200
    assert "SIMULATED CHECKOUT — no real payment" in page.text
    assert "5.00 USD" in page.text
    return client, location


def test_paying_on_the_simulated_checkout_runs_the_real_webhook(
    simulated: tuple[Shop, str],
) -> None:
    shop, base = simulated
    uid = make_user(shop.db, credits=1_000)
    client, location = _simulated_buy(shop, base, uid)
    sid = location.rsplit("/", 1)[-1]
    paid = client.post(location + "/pay")
    assert paid.status_code == 303, paid.text
    assert paid.headers["location"] == f"{PUBLIC}/credits/success?session_id={sid}"
    assert shop.balance(uid) == 1_000 + STARTER
    with shop.db.read() as conn:
        event = conn.execute(sa.select(stripe_events)).one()
    assert (event.type, event.outcome) == ("checkout.session.completed", "credited")
    assert event.event_id.startswith("evt_sim_")
    history = list_purchases(shop.db, user_id=uid)
    assert [(p.checkout_session_id, p.status_label) for p in history] == [(sid, "Paid")]
    # The success page reads the local purchase and finds it credited, once.
    result = checkout.confirm_checkout(shop.db, shop.settings, user_id=uid, session_id=sid)
    assert (result.status, result.credits) == (FulfilmentStatus.CREDITED, STARTER)
    assert client.post(location + "/pay").status_code == 303  # pressing Pay again
    assert shop.balance(uid) == 1_000 + STARTER
    assert verify_ledger(shop.db) == []


def test_cancelling_the_simulated_checkout_charges_nothing(simulated: tuple[Shop, str]) -> None:
    shop, base = simulated
    uid = make_user(shop.db)
    client, location = _simulated_buy(shop, base, uid)
    sid = location.rsplit("/", 1)[-1]
    cancelled = client.post(location + "/cancel")
    assert cancelled.status_code == 303
    assert cancelled.headers["location"] == f"{PUBLIC}/credits/cancel"
    assert shop.purchase(sid).status == "expired"
    assert client.post(location + "/pay").status_code == 400  # a cancelled checkout is over
    assert shop.balance(uid) == 0
    assert list_purchases(shop.db, user_id=uid) == []
    result = checkout.confirm_checkout(shop.db, shop.settings, user_id=uid, session_id=sid)
    assert result.status == FulfilmentStatus.CANCELLED


def test_the_simulated_checkout_is_only_for_its_owner(simulated: tuple[Shop, str]) -> None:
    shop, base = simulated
    owner, other = make_user(shop.db), make_user(shop.db)
    _, location = _simulated_buy(shop, base, owner)
    intruder = httpx.Client(base_url=base, headers=shop.session_cookie(other), timeout=30)
    assert intruder.get(location).status_code == 404
    assert intruder.post(location + "/pay").status_code == 404
    anonymous = httpx.get(location)
    assert anonymous.status_code == 303
    assert shop.balance(owner) == 0


def test_there_is_no_simulated_checkout_with_real_stripe(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = _bought(shop, uid)
    response = shop.client.get(f"/checkout/simulated/{sid}", headers=shop.session_cookie(uid))
    assert response.status_code == 404
    assert (
        shop.client.post(
            f"/checkout/simulated/{sid}/pay", headers=shop.session_cookie(uid)
        ).status_code
        == 404
    )


# --- configuration --------------------------------------------------------------------------


def _settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


def test_production_without_stripe_never_offers_the_simulated_checkout(db: Database) -> None:
    settings = _settings(AICREDITS_ENV="prod", database_url=db.url)
    uid = make_user(db)
    with pytest.raises(PaymentsUnavailable):
        checkout.start_checkout(db, settings, user_id=uid, pack_id="starter")
    assert stripe_config.webhook_secret(settings) is None
    assert count(db, purchases) == 0


def test_the_dev_webhook_secret_is_made_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "data" / "dev_webhook_secret"
    first = stripe_api.load_or_create_dev_secret(path)
    assert first.startswith("whsec_dev_") and len(first) == len("whsec_dev_") + 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stripe_api.load_or_create_dev_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["dev_webhook_secret"]


def test_packs_are_offered_with_price_currency_and_credits() -> None:
    offers = packs.list_packs(_settings())
    assert [(o.id, o.label, o.price, o.credits) for o in offers] == [
        ("starter", "Starter", "5.00 USD", 5_000),
        ("plus", "Plus", "20.00 USD", 22_000),
    ]
