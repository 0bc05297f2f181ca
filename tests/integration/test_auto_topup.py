"""Auto top-up against a fake of Stripe's HTTP API, on SQLite and Postgres: a threshold crossed
by chat turns buys the pack exactly once (20 concurrent turns and racing job runs included),
a success is credited once whether the webhook or the job's own answer comes first, failures
are explained and turn auto top-up off after too many, the monthly cap holds, and a refund of
a top-up takes its credits back. verify-ledger stays clean throughout."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import auto_topups, ledger_entries, purchases, utcnow
from aicredits.domain.auto_topup import InvalidAutoTopUp
from aicredits.services import auto_topup, jobs, ledger, reconciliation, thresholds
from aicredits.services.purchases import list_purchases
from aicredits.services.verify import verify_ledger
from aicredits.settings import Settings, get_settings
from tests.factories import make_user, new_key
from tests.integration import fake_stripe as fs
from tests.integration.fake_stripe import FakeStripe, Shop, make_shop
from tests.integration.test_concurrency import run_together
from tests.servers import serve_asgi
from tests.smtp_sink import Sink, smtp_sink

STARTER = 5_000  # credits of the starter pack, for 500 (5.00 USD)
THRESHOLD = 500


@pytest.fixture(scope="module")
def stripe_server() -> Iterator[tuple[FakeStripe, str]]:
    fake = FakeStripe()
    with serve_asgi(fake.app, ready_path="/health") as base:
        yield fake, base


@pytest.fixture
def fake(stripe_server: tuple[FakeStripe, str]) -> FakeStripe:
    fake = stripe_server[0]
    fake.requests.clear()
    fake.payment_intents.clear()
    fake.charge_outcomes.clear()
    fake.charge_delay = 0.0
    return fake


@pytest.fixture
def shop(
    db: Database, monkeypatch: pytest.MonkeyPatch, stripe_server: tuple[FakeStripe, str]
) -> Iterator[Shop]:
    yield make_shop(
        db,
        monkeypatch,
        STRIPE_SECRET_KEY="sk_test_fake",
        STRIPE_API_BASE=stripe_server[1],
        AUTO_TOPUP_MONTHLY_CAP="4",
        AUTO_TOPUP_MAX_FAILURES="3",
        AUTO_TOPUP_RETRY_MINUTES="60",
    )
    get_settings.cache_clear()


def spend(db: Database, user_id: int, credits: int) -> None:
    """What a chat turn does to the ledger: reserve, then settle what it used."""
    hold = ledger.reserve(db, user_id=user_id, credits=credits, request_id=new_key("req"))
    ledger.settle(db, hold=hold, actual_credits=credits)


def save_card(shop: Shop, fake: FakeStripe, user_id: int) -> None:
    """Save a card as a user does: Checkout in setup mode, then Stripe's webhook."""
    url = auto_topup.start_card_setup(shop.db, shop.settings, user_id=user_id)
    session_id = url.rsplit("/", 1)[-1]
    body = fs.event("checkout.session.completed", fake.complete_setup(session_id))
    response = shop.deliver(body)
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "card_saved"


def turn_on(shop: Shop, user_id: int, *, cap: int = 4) -> None:
    auto_topup.save_settings(
        shop.db,
        shop.settings,
        user_id=user_id,
        enabled=True,
        threshold=THRESHOLD,
        pack_id="starter",
        monthly_cap=cap,
    )


def ready_user(shop: Shop, fake: FakeStripe, *, credits: int = 1_000, cap: int = 4) -> int:
    user = make_user(shop.db, credits=credits, email=f"topup-{new_key()[-8:]}@example.test")
    save_card(shop, fake, user)
    turn_on(shop, user, cap=cap)
    return user


def topups(db: Database, user_id: int) -> list[Any]:
    with db.read() as conn:
        return list(
            conn.execute(
                sa.select(auto_topups)
                .where(auto_topups.c.user_id == user_id)
                .order_by(auto_topups.c.id)
            ).all()
        )


def purchase_credits(db: Database, user_id: int) -> int:
    with db.read() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(ledger_entries.c.amount), 0)).where(
                    ledger_entries.c.user_id == user_id, ledger_entries.c.kind == "purchase"
                )
            ).scalar_one()
        )


def clean(db: Database) -> None:
    assert verify_ledger(db) == []


def pi_event(fake: FakeStripe, pid: str, event_type: str = "payment_intent.succeeded") -> str:
    return fs.event(event_type, dict(fake.payment_intents[pid]))


# --- the card ---------------------------------------------------------------------------------


def test_a_card_saved_through_checkout_in_setup_mode_shows_its_brand_and_last_four(
    shop: Shop, fake: FakeStripe
) -> None:
    user = make_user(shop.db, credits=100)
    url = auto_topup.start_card_setup(shop.db, shop.settings, user_id=user)
    session_id = url.rsplit("/", 1)[-1]
    created = fake.calls("POST", "/v1/checkout/sessions")[-1].params
    assert created["mode"] == "setup" and created["customer"].startswith("cus_fake_")
    fake.complete_setup(session_id, brand="mastercard", last4="4444")
    # The success page reads the session back; the webhook after it changes nothing.
    assert auto_topup.confirm_card_setup(
        shop.db, shop.settings, user_id=user, session_id=session_id
    )
    response = shop.deliver(fs.event("checkout.session.completed", fake.sessions[session_id]))
    assert response.json()["outcome"] in ("card_already_saved", "unknown_setup_session")
    view = auto_topup.view(shop.db, shop.settings, user_id=user)
    assert (view.has_card, view.card_brand, view.card_last4) == (True, "mastercard", "4444")
    auto_topup.remove_card(shop.db, shop.settings, user_id=user)
    assert fake.detached and not auto_topup.view(shop.db, shop.settings, user_id=user).has_card


def test_a_setup_session_not_made_here_saves_nothing(shop: Shop, fake: FakeStripe) -> None:
    user = make_user(shop.db, credits=100)
    stranger = fake._setup_session({"customer": "cus_someone_else", "currency": "usd"})
    body = fs.event("checkout.session.completed", fake.complete_setup(stranger["id"]))
    assert shop.deliver(body).json()["outcome"] == "unknown_setup_session"
    assert not auto_topup.confirm_card_setup(
        shop.db, shop.settings, user_id=user, session_id=stranger["id"]
    )
    assert not auto_topup.view(shop.db, shop.settings, user_id=user).has_card


def test_turning_on_needs_a_card_and_a_pack_larger_than_the_threshold(shop: Shop) -> None:
    user = make_user(shop.db, credits=100)
    with pytest.raises(InvalidAutoTopUp, match="Save a card"):
        turn_on(shop, user)
    with pytest.raises(InvalidAutoTopUp, match="larger than the threshold"):
        auto_topup.save_settings(
            shop.db,
            shop.settings,
            user_id=user,
            enabled=False,
            threshold=STARTER,
            pack_id="starter",
            monthly_cap=4,
        )


def test_the_form_suggests_a_threshold_that_can_be_saved_as_it_is(
    shop: Shop, fake: FakeStripe
) -> None:
    """A new user who saves a card and turns auto top-up on, changing nothing else, gets a
    working setting: the form suggests a fifth of the pack until a threshold is saved."""
    user = make_user(shop.db, credits=100)
    fresh = auto_topup.view(shop.db, shop.settings, user_id=user)
    pack = shop.settings.pack(fresh.pack_id)
    assert pack is not None
    assert auto_topup.form_threshold(shop.settings, fresh) == pack.credits // 5
    save_card(shop, fake, user)
    with_card = auto_topup.view(shop.db, shop.settings, user_id=user)
    suggested = auto_topup.form_threshold(shop.settings, with_card)
    assert suggested == pack.credits // 5
    auto_topup.save_settings(
        shop.db, shop.settings, user_id=user, enabled=True, threshold=suggested,
        pack_id=with_card.pack_id, monthly_cap=with_card.monthly_cap,
    )  # fmt: skip
    saved = auto_topup.view(shop.db, shop.settings, user_id=user)
    assert saved.enabled and saved.threshold == suggested
    auto_topup.save_settings(
        shop.db, shop.settings, user_id=user, enabled=True, threshold=700,
        pack_id=with_card.pack_id, monthly_cap=with_card.monthly_cap,
    )  # fmt: skip
    changed = auto_topup.view(shop.db, shop.settings, user_id=user)
    assert auto_topup.form_threshold(shop.settings, changed) == 700


# --- the trigger ------------------------------------------------------------------------------


def test_20_concurrent_turns_crossing_the_threshold_trigger_exactly_one_top_up(
    shop: Shop, fake: FakeStripe
) -> None:
    user = ready_user(shop, fake, credits=1_000)
    fake.charge_delay = 0.05  # widen the window in which job runs could race
    done = threading.Event()

    def turn() -> None:
        spend(shop.db, user, 30)

    errors: list[BaseException] = []

    def job_runs() -> None:
        while not done.is_set():
            try:
                jobs.run_auto_topups(shop.db, shop.settings)
            except Exception as exc:  # collected and checked below
                errors.append(exc)

    runners = [threading.Thread(target=job_runs) for _ in range(3)]
    for runner in runners:
        runner.start()
    try:
        results = run_together([turn] * 20)
    finally:
        done.set()
        for runner in runners:
            runner.join(timeout=60)
    assert all(r is None for r in results), results
    assert errors == []
    jobs.run_auto_topups(shop.db, shop.settings)  # whatever the racing runs left
    jobs.run_auto_topups(shop.db, shop.settings)
    rows = topups(shop.db, user)
    assert [r.status for r in rows] == ["succeeded"]
    assert fake.created_payment_intents() == 1
    charge = fake.calls("POST", "/v1/payment_intents")[0]
    assert charge.params["off_session"] == "true" and charge.params["confirm"] == "true"
    assert charge.params["amount"] == "500" and charge.headers["idempotency-key"].endswith(
        rows[0].key
    )
    assert purchase_credits(shop.db, user) == STARTER
    assert shop.balance(user) == 1_000 - 20 * 30 + STARTER
    clean(shop.db)


def test_nothing_happens_above_the_threshold_or_when_off(shop: Shop, fake: FakeStripe) -> None:
    user = ready_user(shop, fake, credits=1_000)
    assert auto_topup.run_due(shop.db, shop.settings) == 0
    auto_topup.turn_off(shop.db, user_id=user)
    spend(shop.db, user, 900)
    assert auto_topup.run_due(shop.db, shop.settings) == 0
    assert fake.created_payment_intents() == 0


# --- fulfilment -------------------------------------------------------------------------------


def test_the_job_s_answer_first_then_the_webhook_credits_once(shop: Shop, fake: FakeStripe) -> None:
    user = ready_user(shop, fake)
    spend(shop.db, user, 600)
    assert auto_topup.run_due(shop.db, shop.settings) == 1
    (row,) = topups(shop.db, user)
    assert row.status == "succeeded" and shop.balance(user) == 400 + STARTER
    response = shop.deliver(pi_event(fake, row.payment_intent_id))
    assert response.json()["outcome"] == "already_credited"
    assert purchase_credits(shop.db, user) == STARTER
    listed = list_purchases(shop.db, user_id=user)
    assert [(p.status, p.credits, p.payment_intent_id) for p in listed] == [
        ("paid", STARTER, row.payment_intent_id)
    ]
    clean(shop.db)


def test_the_webhook_first_then_the_job_s_read_back_credits_once(
    shop: Shop, fake: FakeStripe
) -> None:
    user = ready_user(shop, fake)
    spend(shop.db, user, 600)
    fake.charge_outcomes.append("processing")
    assert auto_topup.run_due(shop.db, shop.settings) == 1
    (row,) = topups(shop.db, user)
    assert row.status == "processing" and shop.balance(user) == 400
    # In flight: no second top-up however often the job runs meanwhile.
    assert auto_topup.run_due(shop.db, shop.settings) == 0
    fake.settle_payment_intent(row.payment_intent_id)
    response = shop.deliver(pi_event(fake, row.payment_intent_id))
    assert response.json()["outcome"] == "credited"
    auto_topup.run_due(shop.db, shop.settings)  # the job's read-back finds it done
    assert [r.status for r in topups(shop.db, user)] == ["succeeded"]
    assert purchase_credits(shop.db, user) == STARTER
    assert fake.created_payment_intents() == 1
    clean(shop.db)


def test_a_webhook_before_the_job_recorded_its_payment_credits_nothing_and_the_job_credits_once(
    shop: Shop, fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = ready_user(shop, fake)
    spend(shop.db, user, 600)
    real = auto_topup.record_payment
    early: list[str] = []

    def webhook_first(*args: Any, **kwargs: Any) -> str:
        if kwargs.get("topup_id") is not None and not early:
            # Stripe's event overtakes the job's own answer (the webhook's own call of
            # record_payment, without a topup_id, goes straight through).
            pid = next(iter(fake.payment_intents))
            early.append(shop.deliver(pi_event(fake, pid)).json()["outcome"])
        return real(*args, **kwargs)

    monkeypatch.setattr(auto_topup, "record_payment", webhook_first)
    assert auto_topup.run_due(shop.db, shop.settings) == 1
    assert early == ["unknown_payment_intent"]
    (row,) = topups(shop.db, user)
    assert row.status == "succeeded"
    assert shop.deliver(pi_event(fake, row.payment_intent_id)).json()["outcome"] == (
        "already_credited"
    )
    assert purchase_credits(shop.db, user) == STARTER
    clean(shop.db)


def test_a_top_up_whose_answer_was_lost_is_asked_again_with_the_same_key(
    shop: Shop, fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = ready_user(shop, fake)
    spend(shop.db, user, 600)
    real = auto_topup.record_payment
    monkeypatch.setattr(auto_topup, "record_payment", lambda *a, **k: "lost")
    assert auto_topup.run_due(shop.db, shop.settings) == 1  # charged; the answer lost
    monkeypatch.setattr(auto_topup, "record_payment", real)
    assert auto_topup.run_due(shop.db, shop.settings) == 0  # resumes the one in flight
    keys = {c.headers["idempotency-key"] for c in fake.calls("POST", "/v1/payment_intents")}
    assert len(fake.calls("POST", "/v1/payment_intents")) == 2 and len(keys) == 1
    assert fake.created_payment_intents() == 1
    assert purchase_credits(shop.db, user) == STARTER
    clean(shop.db)


def test_a_payment_intent_not_made_here_credits_nothing(shop: Shop, fake: FakeStripe) -> None:
    user = make_user(shop.db, credits=10)
    forged = {
        "id": "pi_not_ours",
        "object": "payment_intent",
        "amount": 500,
        "currency": "usd",
        "customer": "cus_x",
        "status": "succeeded",
        "metadata": {"user_id": str(user), "auto_topup": "topup_" + "0" * 32},
    }
    response = shop.deliver(fs.event("payment_intent.succeeded", forged))
    assert response.json()["outcome"] == "unknown_payment_intent"
    assert shop.balance(user) == 10
    clean(shop.db)


# --- failures ---------------------------------------------------------------------------------


@pytest.fixture
def sink() -> Iterator[Sink]:
    with smtp_sink() as sink:
        yield sink


def test_a_decline_then_authentication_then_auto_off_after_three_failures(
    shop: Shop, fake: FakeStripe, sink: Sink
) -> None:
    settings = Settings(
        _env_file=None,
        database_url=shop.db.url,
        stripe_secret_key=shop.settings.stripe_secret_key,
        stripe_api_base=shop.settings.stripe_api_base,
        smtp_host=sink.host,
        smtp_port=sink.port,
        smtp_from="billing@example.test",
        smtp_starttls=False,
    )
    user = ready_user(shop, fake)
    spend(shop.db, user, 600)
    fake.charge_outcomes.extend(["card_declined", "authentication_required", "expired_card"])
    now = utcnow()

    assert jobs.run_auto_topups(shop.db, settings, now=now) == 1
    view = auto_topup.view(shop.db, settings, user_id=user)
    assert (view.enabled, view.notice_kind, view.consecutive_failures) == (True, "failed", 1)
    assert "declined" in view.notice
    # No new try before the retry delay.
    assert jobs.run_auto_topups(shop.db, settings, now=now + timedelta(minutes=5)) == 0

    later = now + timedelta(minutes=61)
    assert jobs.run_auto_topups(shop.db, settings, now=later) == 1
    view = auto_topup.view(shop.db, settings, user_id=user)
    assert view.notice_kind == "action_required" and "confirm" in view.notice
    # The banner every page shows, until dismissed.
    notice = thresholds.status(shop.db, settings, user_id=user).topup
    assert notice is not None and (notice.kind, notice.pack_id) == ("action_required", "starter")
    auto_topup.dismiss_notice(shop.db, user_id=user)
    assert thresholds.status(shop.db, settings, user_id=user).topup is None

    latest = later + timedelta(minutes=61)
    assert jobs.run_auto_topups(shop.db, settings, now=latest) == 1
    view = auto_topup.view(shop.db, settings, user_id=user)
    assert (view.enabled, view.notice_kind, view.consecutive_failures) == (False, "disabled", 3)
    assert "now off" in view.notice and "expired" in view.notice
    assert [r.status for r in topups(shop.db, user)] == ["failed", "requires_action", "failed"]
    assert jobs.run_auto_topups(shop.db, settings, now=latest + timedelta(days=1)) == 0
    # One email per failure, the last saying it is off.
    assert len(sink.messages) == 3
    assert "now off" in sink.messages[-1].replace("=\r\n", "").replace("\r\n", " ")
    assert shop.balance(user) == 400 and purchase_credits(shop.db, user) == 0
    assert [p.status for p in list_purchases(shop.db, user_id=user)] == ["failed"] * 3
    # A failed payment event after the job recorded it counts nothing twice.
    pid = topups(shop.db, user)[0].payment_intent_id
    shop.deliver(pi_event(fake, pid, "payment_intent.payment_failed"))
    assert auto_topup.view(shop.db, settings, user_id=user).consecutive_failures == 3
    clean(shop.db)


def test_the_monthly_cap_stops_further_top_ups_until_next_month(
    shop: Shop, fake: FakeStripe
) -> None:
    user = ready_user(shop, fake, credits=1_000, cap=2)
    now = utcnow().replace(day=1, hour=12)
    for _ in range(2):
        spend(shop.db, user, shop.balance(user) - 100)
        assert auto_topup.run_due(shop.db, shop.settings, now=now) == 1
    spend(shop.db, user, shop.balance(user) - 100)
    assert auto_topup.run_due(shop.db, shop.settings, now=now) == 0
    view = auto_topup.view(shop.db, shop.settings, user_id=user, now=now)
    assert view.notice_kind == "cap_reached" and view.this_month == 2
    assert fake.created_payment_intents() == 2
    assert auto_topup.run_due(shop.db, shop.settings, now=now + timedelta(days=32)) == 1
    assert purchase_credits(shop.db, user) == 3 * STARTER
    clean(shop.db)


def test_a_refund_of_a_top_up_takes_its_credits_back(shop: Shop, fake: FakeStripe) -> None:
    user = ready_user(shop, fake)
    spend(shop.db, user, 600)
    auto_topup.run_due(shop.db, shop.settings)
    (row,) = topups(shop.db, user)
    charge_id = fake.payment_intents[row.payment_intent_id]["latest_charge"]
    body = fs.event(
        "charge.refunded",
        fs.charge(charge_id, payment_intent=row.payment_intent_id, amount_refunded=500),
    )
    assert shop.deliver(body).json()["outcome"] == "refund_recorded"
    assert shop.balance(user) == 400
    with shop.db.read() as conn:
        status, clawed = conn.execute(
            sa.select(purchases.c.status, purchases.c.credits_clawed_back).where(
                purchases.c.id == row.purchase_id
            )
        ).one()
    assert (status, clawed) == ("paid", STARTER)
    assert list_purchases(shop.db, user_id=user)[0].status_label == "Refunded"
    clean(shop.db)


# --- simulated mode ---------------------------------------------------------------------------


@pytest.fixture
def simulated(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    yield make_shop(db, monkeypatch)
    get_settings.cache_clear()


def test_simulated_mode_saves_a_simulated_card_and_the_switch_makes_the_next_charge_fail(
    simulated: Shop,
) -> None:
    shop = simulated
    user = make_user(shop.db, credits=1_000)
    assert auto_topup.start_card_setup(shop.db, shop.settings, user_id=user) == (
        "/credits?card=saved"
    )
    view = auto_topup.view(shop.db, shop.settings, user_id=user)
    assert view.card_simulated and view.card_last4 == "4242"
    turn_on(shop, user)
    auto_topup.set_simulated_outcome(
        shop.db, shop.settings, user_id=user, outcome="authentication_required"
    )
    spend(shop.db, user, 600)
    now = utcnow()
    assert auto_topup.run_due(shop.db, shop.settings, now=now) == 1
    view = auto_topup.view(shop.db, shop.settings, user_id=user)
    assert view.notice_kind == "action_required" and view.simulate_next == ""
    assert auto_topup.run_due(shop.db, shop.settings, now=now + timedelta(hours=2)) == 1
    assert shop.balance(user) == 400 + STARTER
    assert [r.status for r in topups(shop.db, user)] == ["requires_action", "succeeded"]
    assert auto_topup.view(shop.db, shop.settings, user_id=user).notice_kind == ""
    clean(shop.db)


def test_reconciliation_checks_a_top_up_against_its_payment_intent(
    shop: Shop, fake: FakeStripe
) -> None:
    # A top-up has no Checkout Session: reconciliation asks Stripe about its PaymentIntent.
    user = ready_user(shop, fake)
    spend(shop.db, user, 600)
    assert auto_topup.run_due(shop.db, shop.settings) == 1
    (row,) = topups(shop.db, user)
    since = utcnow() - timedelta(days=1)
    report = reconciliation.reconcile(shop.db, shop.settings, since=since)
    assert [d for d in report.discrepancies if d.session_id.startswith("topup_")] == []

    fake.payment_intents[row.payment_intent_id]["status"] = "canceled"
    report = reconciliation.reconcile(shop.db, shop.settings, since=since)
    assert [(d.kind, d.session_id.startswith("topup_")) for d in report.discrepancies] == [
        (reconciliation.CREDITED_NOT_PAID, True)
    ]
    clean(shop.db)
