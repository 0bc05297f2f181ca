"""The payments trust boundary, on SQLite and Postgres, in simulated mode and against a fake
Stripe HTTP API: a correctly signed event for a session the app did not create credits
nothing, leaves one unmatched payment and gets a 200, whatever its metadata says; a session
the app created is credited exactly once whichever of the webhook and the success page comes
first; a session whose row was lost is adopted from Stripe's view with the pack's credits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import ledger_entries, purchases, unmatched_payments
from aicredits.domain import checkout_marker
from aicredits.services import checkout, payment_trust
from aicredits.services.fulfilment import FulfilmentStatus
from aicredits.services.payment_errors import UnknownCheckoutSession
from aicredits.services.verify import verify_ledger
from aicredits.settings import get_settings
from tests.factories import make_user
from tests.integration import fake_stripe as fs
from tests.integration.fake_stripe import FakeStripe, Shop, make_shop
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
    return stripe_server[0]


def stripe_shop(db: Database, monkeypatch: pytest.MonkeyPatch, base: str) -> Shop:
    return make_shop(db, monkeypatch, STRIPE_SECRET_KEY="sk_test_fake", STRIPE_API_BASE=base)


@pytest.fixture(params=["simulated", "stripe"])
def shop(
    request: pytest.FixtureRequest,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    stripe_server: tuple[FakeStripe, str],
) -> Iterator[Shop]:
    if request.param == "simulated":
        yield make_shop(db, monkeypatch)
    else:
        yield stripe_shop(db, monkeypatch, stripe_server[1])
    get_settings.cache_clear()


@pytest.fixture
def real(
    db: Database, monkeypatch: pytest.MonkeyPatch, stripe_server: tuple[FakeStripe, str]
) -> Iterator[Shop]:
    yield stripe_shop(db, monkeypatch, stripe_server[1])
    get_settings.cache_clear()


def count(db: Database, table: sa.Table, *where: Any) -> int:
    with db.read() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
        )


def unmatched(db: Database) -> list[Any]:
    with db.read() as conn:
        return list(conn.execute(sa.select(unmatched_payments)).all())


def our_marker(shop: Shop, user_id: int, pack_id: str = "starter") -> str:
    """What the app writes into a session it creates (as if it had, and lost the row)."""
    return payment_trust.new_marker(shop.settings, user_id=user_id, pack_id=pack_id)


def foreign_session(sid: str, user_id: int, **changes: Any) -> dict[str, Any]:
    """A paid Checkout Session in Stripe's shape; `metadata_extra` adds to its metadata."""
    extra = changes.pop("metadata_extra", {})
    mode = changes.pop("mode", "payment")
    session = fs.checkout_session(sid, user_id=user_id, **changes)
    session["metadata"] = {**session["metadata"], **extra}
    session["mode"] = mode
    return session


def refusal_cases(shop: Shop, uid: int) -> dict[str, tuple[dict[str, Any], str]]:
    """Each refused session (as Stripe has it) and the reason the app gives in Stripe mode."""
    forged = checkout_marker.make_marker(
        b"not the app's key", user_id=uid, pack_id="starter", nonce="0" * 32
    )
    marker = {"aicredits_ref": our_marker(shop, uid)}
    return {
        "unknown session id": (foreign_session("cs_test_unknown_1", uid), "unknown_session"),
        "metadata credits inflated": (
            foreign_session("cs_test_inflated_1", uid, credits=1_000_000),
            "no_marker",
        ),
        "pack not configured": (
            foreign_session(
                "cs_test_gold_1",
                uid,
                pack_id="gold",
                credits=50_000,
                amount=1,
                metadata_extra={"aicredits_ref": our_marker(shop, uid, "gold")},
            ),
            "unknown_pack",
        ),
        "amount not the pack's": (
            foreign_session("cs_test_cheap_1", uid, amount=1, metadata_extra=marker),
            "amount_mismatch",
        ),
        "currency not the pack's": (
            foreign_session("cs_test_eur_1", uid, currency="eur", metadata_extra=marker),
            "amount_mismatch",
        ),
        "no marker": (foreign_session("cs_test_nomark_1", uid), "no_marker"),
        "forged marker": (
            foreign_session("cs_test_forged_1", uid, metadata_extra={"aicredits_ref": forged}),
            "forged_marker",
        ),
        "subscription mode": (
            foreign_session("cs_test_sub_1", uid, mode="subscription", metadata_extra=marker),
            "not_payment_mode",
        ),
    }


CASES = [
    "unknown session id",
    "metadata credits inflated",
    "pack not configured",
    "amount not the pack's",
    "currency not the pack's",
    "no marker",
    "forged marker",
    "subscription mode",
]


@pytest.mark.parametrize("case", CASES)
def test_a_signed_event_for_a_session_not_ours_credits_nothing_and_is_recorded_once(
    shop: Shop, fake: FakeStripe, case: str
) -> None:
    uid = make_user(shop.db)
    session, reason = refusal_cases(shop, uid)[case]
    session = {**session, "id": f"{session['id']}_{uid}_{shop.db.url[:5]}"}
    if shop.settings.simulated_checkout:
        reason = "unknown_session"  # no Stripe to ask: any session with no row is refused
    elif case != "unknown session id":
        fake.add_session(session)
    for attempt in range(2):  # a second event for it adds no second record
        event_type = "checkout.session.completed"
        if attempt:
            event_type = "checkout.session.async_payment_succeeded"
        response = shop.deliver(fs.event(event_type, session))
        assert response.status_code == 200
        assert response.json()["outcome"] == "unmatched"
    assert shop.balance(uid) == 0
    assert count(shop.db, ledger_entries) == 0
    assert count(shop.db, purchases) == 0
    (row,) = unmatched(shop.db)
    assert (row.checkout_session_id, row.reason, row.source) == (session["id"], reason, "webhook")
    assert (row.amount, row.currency) == (session["amount_total"], session["currency"])
    assert row.event_id.startswith("evt_test_") and row.cleared_at is None
    assert verify_ledger(shop.db) == []


def test_the_event_is_not_believed_stripes_own_view_of_the_session_is(
    real: Shop, fake: FakeStripe
) -> None:
    # The event claims our marker and the pack's price; Stripe says the session has neither.
    uid = make_user(real.db)
    at_stripe = foreign_session("cs_test_liar_1", uid, amount=1)
    fake.add_session(at_stripe)
    claimed = {
        **at_stripe,
        "amount_total": 500,
        "metadata": {"aicredits_ref": our_marker(real, uid)},
    }
    response = real.deliver(fs.event("checkout.session.completed", claimed))
    assert response.json()["outcome"] == "unmatched"
    assert real.balance(uid) == 0
    (row,) = unmatched(real.db)
    assert (row.reason, row.amount) == ("no_marker", 1)


def test_a_refused_payment_logs_a_warning_and_counts_a_metric(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    from aicredits.adapters.metrics import UNMATCHED_PAYMENTS

    counter = UNMATCHED_PAYMENTS.labels(reason="unknown_session", source="webhook")
    before = counter._value.get()
    uid = make_user(shop.db)
    session = foreign_session(f"cs_test_nowhere_{uid}", uid)
    with caplog.at_level("WARNING", logger="aicredits.services.payment_trust"):
        shop.deliver(fs.event("checkout.session.completed", session))
    assert any(
        "unmatched payment" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records
    )
    assert counter._value.get() == before + 1


def test_an_unpaid_session_not_ours_is_ignored_without_a_record(shop: Shop) -> None:
    uid = make_user(shop.db)
    session = foreign_session(f"cs_test_open_{uid}", uid, paid=False, status="open")
    response = shop.deliver(fs.event("checkout.session.completed", session))
    assert response.json()["outcome"] == "unknown_session"
    assert count(shop.db, purchases) == count(shop.db, unmatched_payments) == 0


# --- the good paths ---------------------------------------------------------------------------


def test_a_session_the_app_made_is_credited_once_when_the_webhook_comes_first(
    real: Shop, fake: FakeStripe
) -> None:
    uid = make_user(real.db)
    sid = real.start(uid)
    session = fake.pay(sid)
    first = real.deliver(fs.event("checkout.session.completed", session))
    assert first.json()["outcome"] == "credited"
    page = checkout.confirm_checkout(real.db, real.settings, user_id=uid, session_id=sid)
    assert (page.status, page.newly_credited) == (FulfilmentStatus.CREDITED, False)
    again = real.deliver(fs.event("checkout.session.completed", session))
    assert again.json()["outcome"] == "already_credited"
    assert real.balance(uid) == STARTER
    assert count(real.db, unmatched_payments) == 0
    assert verify_ledger(real.db) == []


def test_a_session_the_app_made_is_credited_once_when_the_success_page_comes_first(
    real: Shop, fake: FakeStripe
) -> None:
    uid = make_user(real.db)
    sid = real.start(uid)
    session = fake.pay(sid)
    page = checkout.confirm_checkout(real.db, real.settings, user_id=uid, session_id=sid)
    assert (page.status, page.newly_credited) == (FulfilmentStatus.CREDITED, True)
    late = real.deliver(fs.event("checkout.session.completed", session))
    assert late.json()["outcome"] == "already_credited"
    assert real.balance(uid) == STARTER
    assert verify_ledger(real.db) == []


def test_a_session_of_ours_paid_at_another_amount_is_refused(real: Shop, fake: FakeStripe) -> None:
    uid = make_user(real.db)
    sid = real.start(uid)
    session = {**fake.pay(sid), "amount_total": 1}
    response = real.deliver(fs.event("checkout.session.completed", session))
    assert response.json()["outcome"] == "unmatched"
    assert real.balance(uid) == 0
    (row,) = unmatched(real.db)
    assert (row.checkout_session_id, row.reason) == (sid, "amount_mismatch")


def _lose_row(db: Database, sid: str) -> None:
    with db.transaction() as conn:
        conn.execute(sa.delete(purchases).where(purchases.c.checkout_session_id == sid))


@pytest.mark.parametrize("first", ["webhook", "success page"])
def test_a_session_whose_row_was_lost_is_adopted_from_stripe_with_the_packs_credits(
    real: Shop, fake: FakeStripe, first: str
) -> None:
    uid = make_user(real.db)
    sid = real.start(uid)
    _lose_row(real.db, sid)
    # Whatever the metadata says now, the credits are the pack's.
    fake.sessions[sid]["metadata"]["credits"] = "1000000"
    session = fake.pay(sid)
    if first == "webhook":
        assert (
            real.deliver(fs.event("checkout.session.completed", session)).json()["outcome"]
            == "credited"
        )
    else:
        page = checkout.confirm_checkout(real.db, real.settings, user_id=uid, session_id=sid)
        assert (page.status, page.newly_credited) == (FulfilmentStatus.CREDITED, True)
    assert (
        real.deliver(fs.event("checkout.session.completed", session)).json()["outcome"]
        == "already_credited"
    )
    assert real.balance(uid) == STARTER
    purchase = real.purchase(sid)
    assert (purchase.user_id, purchase.pack_id, purchase.credits) == (uid, "starter", STARTER)
    assert count(real.db, unmatched_payments) == 0
    assert verify_ledger(real.db) == []


def test_the_success_page_refuses_a_paid_session_not_ours_and_records_it(
    real: Shop, fake: FakeStripe
) -> None:
    uid = make_user(real.db)
    sid = f"cs_test_link_{uid}"
    fake.add_session(foreign_session(sid, uid, credits=1_000_000))
    with pytest.raises(UnknownCheckoutSession):
        checkout.confirm_checkout(real.db, real.settings, user_id=uid, session_id=sid)
    assert real.balance(uid) == 0
    (row,) = unmatched(real.db)
    assert (row.reason, row.source, row.event_id) == ("no_marker", "success_page", None)
