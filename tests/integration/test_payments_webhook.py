"""The Stripe webhook on SQLite and Postgres: signed events of every type, each applied
exactly once however it is replayed, reordered or interrupted; every forgery refused with
nothing written; verify-ledger clean after each scenario."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from aicredits.adapters import stripe_api
from aicredits.adapters.db import Database
from aicredits.adapters.tables import (
    account_flags,
    ledger_entries,
    purchases,
    stripe_events,
    threshold_crossings,
    unmatched_payments,
)
from aicredits.services import fulfilment, ledger, refunds, stripe_webhook
from aicredits.services.verify import verify_ledger
from aicredits.settings import get_settings
from tests.dbutil import empty_postgres
from tests.factories import make_user, new_key
from tests.integration import fake_stripe as fs
from tests.integration.fake_stripe import Shop, make_shop
from tests.servers import serve_asgi

STARTER = 5_000  # credits for 500 (5.00 USD), the default starter pack


@pytest.fixture
def shop(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    yield make_shop(db, monkeypatch)
    get_settings.cache_clear()


def count(db: Database, table: sa.Table, *where: Any) -> int:
    with db.read() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
        )


def clean(db: Database) -> None:
    assert verify_ledger(db) == []


def completed(shop: Shop, sid: str, user_id: int, **kw: Any) -> str:
    return fs.event("checkout.session.completed", fs.checkout_session(sid, user_id=user_id, **kw))


def spend(db: Database, user_id: int, credits: int) -> None:
    hold = ledger.reserve(db, user_id=user_id, credits=credits, request_id=new_key("req"))
    ledger.settle(db, hold=hold, actual_credits=credits)


def refunded(sid: str, amount_refunded: int, *, charge_id: str = "ch_1") -> str:
    return fs.event(
        "charge.refunded",
        fs.charge(charge_id, payment_intent=f"pi_{sid}", amount_refunded=amount_refunded),
    )


# --- fulfilment -------------------------------------------------------------------------------


def test_a_paid_completion_credits_the_pack_once(shop: Shop) -> None:
    uid = make_user(shop.db, credits=100)
    sid = shop.start(uid)
    response = shop.deliver(completed(shop, sid, uid))
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "credited"
    assert shop.balance(uid) == 100 + STARTER
    purchase = shop.purchase(sid)
    assert (purchase.status, purchase.credits_granted) == ("paid", STARTER)
    assert purchase.payment_intent_id == f"pi_{sid}"
    with shop.db.read() as conn:
        entry = conn.execute(
            sa.select(ledger_entries).where(ledger_entries.c.idempotency_key == f"purchase:{sid}")
        ).one()
    assert (entry.kind, entry.amount, entry.reference) == ("purchase", STARTER, f"stripe:{sid}")
    clean(shop.db)


def test_replaying_a_completion_ten_times_credits_once(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    body = completed(shop, sid, uid)
    outcomes = []
    for _ in range(10):
        response = shop.deliver(body)  # a fresh signature each time, as Stripe's retries have
        assert response.status_code == 200
        outcomes.append(response.json()["outcome"])
    assert outcomes == ["credited"] * 10  # the replays answer with the stored outcome
    assert shop.balance(uid) == STARTER
    assert count(shop.db, stripe_events) == 1
    assert count(shop.db, ledger_entries, ledger_entries.c.user_id == uid) == 1
    clean(shop.db)


def test_a_second_event_for_the_same_session_credits_nothing_more(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    assert shop.deliver(completed(shop, sid, uid)).json()["outcome"] == "credited"
    again = shop.deliver(completed(shop, sid, uid))  # a new event id, the same session
    assert again.json()["outcome"] == "already_credited"
    assert shop.balance(uid) == STARTER
    assert count(shop.db, stripe_events) == 2
    clean(shop.db)


def _served(shop: Shop) -> Any:
    return serve_asgi(shop.client.app, ready_path="/healthz")


def _concurrently(n: int, job: Callable[[], httpx.Response]) -> list[httpx.Response]:
    gate = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        gate.wait()
        try:
            results[i] = job()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_ten_concurrent_deliveries_of_a_completion_credit_once(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    body = completed(shop, sid, uid)
    with _served(shop) as base:
        responses = _concurrently(
            10,
            lambda: httpx.post(
                base + "/api/stripe/webhook",
                content=body,
                headers={"Stripe-Signature": fs.sign(body, shop.secret)},
                timeout=60,
            ),
        )
    assert [r.status_code for r in responses] == [200] * 10, responses
    assert shop.balance(uid) == STARTER
    assert count(shop.db, ledger_entries, ledger_entries.c.user_id == uid) == 1
    assert count(shop.db, stripe_events) == 1
    clean(shop.db)


def test_an_unpaid_completion_credits_nothing_and_waits(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    response = shop.deliver(completed(shop, sid, uid, paid=False))
    assert response.status_code == 200
    assert response.json()["outcome"] == "processing"
    assert shop.balance(uid) == 0
    assert shop.purchase(sid).status == "pending"
    assert count(shop.db, ledger_entries) == 0
    clean(shop.db)


def test_async_payment_succeeded_after_an_unpaid_completion_credits_once(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid, paid=False))
    succeeded = fs.event(
        "checkout.session.async_payment_succeeded", fs.checkout_session(sid, user_id=uid)
    )
    assert shop.deliver(succeeded).json()["outcome"] == "credited"
    assert shop.deliver(succeeded).json()["outcome"] == "credited"  # replay: stored outcome
    assert shop.balance(uid) == STARTER
    assert shop.purchase(sid).status == "paid"
    clean(shop.db)


def test_async_payment_succeeded_before_its_completion_credits_once(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    succeeded = fs.event(
        "checkout.session.async_payment_succeeded", fs.checkout_session(sid, user_id=uid)
    )
    assert shop.deliver(succeeded).json()["outcome"] == "credited"
    # The completion Stripe sent first for a delayed payment method says "unpaid".
    late = shop.deliver(completed(shop, sid, uid, paid=False))
    assert late.status_code == 200
    assert shop.balance(uid) == STARTER
    assert shop.purchase(sid).status == "paid"  # never moved back to pending
    clean(shop.db)


def test_async_payment_failed_marks_the_purchase_failed_with_no_credits(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid, paid=False))
    failed = fs.event(
        "checkout.session.async_payment_failed", fs.checkout_session(sid, user_id=uid, paid=False)
    )
    assert shop.deliver(failed).json()["outcome"] == "failed"
    assert shop.balance(uid) == 0
    assert shop.purchase(sid).status == "failed"
    assert shop.purchase(sid).status_label == "Failed"
    clean(shop.db)


def test_an_expired_session_is_marked_and_credits_nothing(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    expired = fs.event(
        "checkout.session.expired",
        fs.checkout_session(sid, user_id=uid, paid=False, status="expired"),
    )
    assert shop.deliver(expired).json()["outcome"] == "expired"
    assert shop.purchase(sid).status == "expired"
    assert shop.balance(uid) == 0
    clean(shop.db)


def test_a_completion_for_a_session_not_made_here_is_acknowledged_and_recorded(shop: Shop) -> None:
    # More cases, in simulated and Stripe mode alike: tests/integration/test_payments_trust.py
    foreign = fs.event(
        "checkout.session.completed",
        {**fs.checkout_session("cs_test_elsewhere", user_id=1), "metadata": {}},
    )
    response = shop.deliver(foreign)
    assert response.status_code == 200
    assert response.json()["outcome"] == "unmatched"
    assert count(shop.db, purchases) == 0
    assert count(shop.db, ledger_entries) == 0
    assert count(shop.db, unmatched_payments) == 1


def test_an_unpaid_session_not_made_here_is_ignored_without_a_record(shop: Shop) -> None:
    foreign = fs.event(
        "checkout.session.expired",
        fs.checkout_session("cs_test_elsewhere", user_id=1, paid=False, status="expired"),
    )
    assert shop.deliver(foreign).json()["outcome"] == "unknown_session"
    assert count(shop.db, purchases) == count(shop.db, unmatched_payments) == 0


def test_unknown_event_types_are_acknowledged_and_ignored(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    body = fs.event("customer.created", {"id": "cus_1", "object": "customer"})
    response = shop.deliver(body)
    assert response.status_code == 200
    assert response.json()["outcome"] == "ignored"
    assert shop.purchase(sid).status == "open"
    assert count(shop.db, ledger_entries) == 0


# --- refunds and disputes --------------------------------------------------------------------


def test_a_full_refund_claws_back_the_whole_pack(shop: Shop) -> None:
    uid = make_user(shop.db, credits=300)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid))
    response = shop.deliver(refunded(sid, 500))
    assert response.json()["outcome"] == "refund_recorded"
    assert shop.balance(uid) == 300
    purchase = shop.purchase(sid)
    assert (purchase.amount_refunded, purchase.credits_clawed_back) == (500, STARTER)
    assert purchase.credits_shortfall == 0 and not purchase.flagged
    assert purchase.status_label == "Refunded"
    assert count(shop.db, account_flags) == 0
    clean(shop.db)


def test_a_refund_that_takes_back_most_of_an_allowance_records_its_warnings_at_once(
    shop: Shop,
) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid))
    shop.deliver(refunded(sid, 400))  # 4,000 of the 5,000 credits go back
    with shop.db.read() as conn:
        crossed = sorted(
            conn.execute(
                sa.select(threshold_crossings.c.threshold).where(
                    threshold_crossings.c.user_id == uid
                )
            ).scalars()
        )
    assert crossed == [50, 80]
    clean(shop.db)


def test_partial_refunds_claw_back_pro_rata_and_add_up(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid))
    first = refunded(sid, 150)  # 1.50 of 5.00 bought 1,500 credits
    shop.deliver(first)
    assert shop.balance(uid) == STARTER - 1_500
    assert shop.purchase(sid).status_label == "Partly refunded"
    shop.deliver(refunded(sid, 400))  # a second refund: Stripe's total is now 4.00
    assert shop.balance(uid) == STARTER - 4_000
    shop.deliver(first)  # a replay of the first changes nothing
    shop.deliver(refunded(sid, 150))  # nor does a late copy under another event id
    assert shop.balance(uid) == STARTER - 4_000
    purchase = shop.purchase(sid)
    assert (purchase.amount_refunded, purchase.credits_clawed_back) == (400, 4_000)
    clean(shop.db)


def test_a_refund_takes_the_credits_it_bought_rounded_up_without_drifting(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1,000 credits for 3.00: a cent buys 3 1/3 credits.
    shop = make_shop(
        db, monkeypatch, PACKS='[{"id": "odd", "credits": 1000, "amount": 300, "currency": "usd"}]'
    )
    uid = make_user(db)
    sid = shop.start(uid, pack="odd")
    shop.deliver(completed(shop, sid, uid, pack_id="odd", credits=1_000, amount=300))
    shop.deliver(refunded(sid, 1))
    assert shop.balance(uid) == 1_000 - 4  # 3.33 rounds up
    shop.deliver(refunded(sid, 2))
    assert shop.balance(uid) == 1_000 - 7  # 6.67 in total, not 4 + 4
    shop.deliver(refunded(sid, 300))
    assert shop.balance(uid) == 0  # a full refund takes exactly the pack
    clean(db)
    get_settings.cache_clear()


def test_a_refund_of_spent_credits_takes_what_is_left_and_flags_the_shortfall(
    shop: Shop,
) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid))
    spend(shop.db, uid, 4_000)
    response = shop.deliver(refunded(sid, 500))
    assert response.status_code == 200
    assert shop.balance(uid) == 0  # never below zero
    purchase = shop.purchase(sid)
    assert (purchase.credits_clawed_back, purchase.credits_shortfall) == (1_000, 4_000)
    assert purchase.flagged
    with shop.db.read() as conn:
        flag = conn.execute(sa.select(account_flags)).one()
    assert (flag.user_id, flag.kind, flag.amount) == (uid, "refund_shortfall", 4_000)
    assert flag.purchase_id == purchase.id and flag.cleared_at is None
    assert "4,000" in flag.detail
    shop.deliver(refunded(sid, 500))  # a late copy: no second flag, nothing more taken
    assert count(shop.db, account_flags) == 1
    clean(shop.db)


def test_a_shortfall_is_not_taken_again_from_credits_bought_later(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid))
    spend(shop.db, uid, STARTER)
    shop.deliver(refunded(sid, 500))
    later = shop.start(uid)
    shop.deliver(completed(shop, later, uid))
    shop.deliver(refunded(sid, 500))
    assert shop.balance(uid) == STARTER  # the second pack is untouched; an admin decides
    clean(shop.db)


def test_a_refund_before_its_completion_is_applied_when_the_completion_arrives(
    shop: Shop,
) -> None:
    uid = make_user(shop.db, credits=200)
    sid = shop.start(uid)
    early = shop.deliver(refunded(sid, 200))
    assert early.status_code == 200
    assert early.json()["outcome"] == "parked"
    assert shop.balance(uid) == 200
    shop.deliver(completed(shop, sid, uid))
    assert shop.balance(uid) == 200 + STARTER - 2_000
    purchase = shop.purchase(sid)
    assert (purchase.amount_refunded, purchase.credits_clawed_back) == (200, 2_000)
    with shop.db.read() as conn:
        rows = conn.execute(sa.select(stripe_events.c.type, stripe_events.c.outcome)).all()
    outcomes = {row.type: row.outcome for row in rows}
    assert outcomes["charge.refunded"] == "late_refund_recorded"
    # Replays of either event change nothing.
    shop.deliver(completed(shop, sid, uid))
    shop.deliver(refunded(sid, 200))
    assert shop.balance(uid) == 200 + STARTER - 2_000
    clean(shop.db)


def test_a_full_refund_before_completion_leaves_nothing_credited(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    shop.deliver(refunded(sid, 500))
    shop.deliver(completed(shop, sid, uid))
    assert shop.balance(uid) == 0
    assert shop.purchase(sid).credits_shortfall == 0
    clean(shop.db)


def test_a_dispute_flags_the_account_and_the_purchase_once(shop: Shop) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid))
    body = fs.event(
        "charge.dispute.created", fs.dispute("dp_1", charge_id="ch_1", payment_intent=f"pi_{sid}")
    )
    response = shop.deliver(body)
    assert response.json()["outcome"] == "dispute_flagged"
    assert shop.purchase(sid).flagged
    with shop.db.read() as conn:
        flag = conn.execute(sa.select(account_flags)).one()
    assert (flag.user_id, flag.kind, flag.amount) == (uid, "dispute", STARTER)
    assert "dp_1" in flag.detail
    shop.deliver(body)
    shop.deliver(  # the same dispute under another event id
        fs.event(
            "charge.dispute.created",
            fs.dispute("dp_1", charge_id="ch_1", payment_intent=f"pi_{sid}"),
        )
    )
    assert count(shop.db, account_flags) == 1
    assert shop.balance(uid) == STARTER  # a dispute flags; it takes nothing by itself
    clean(shop.db)


def test_a_dispute_before_its_completion_is_flagged_when_the_completion_arrives(
    shop: Shop,
) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    body = fs.event(
        "charge.dispute.created", fs.dispute("dp_2", charge_id="ch_2", payment_intent=f"pi_{sid}")
    )
    assert shop.deliver(body).json()["outcome"] == "parked"
    assert count(shop.db, account_flags) == 0
    shop.deliver(completed(shop, sid, uid))
    assert shop.purchase(sid).flagged
    assert count(shop.db, account_flags, account_flags.c.kind == "dispute") == 1
    clean(shop.db)


def test_ten_concurrent_deliveries_of_a_refund_claw_back_once(shop: Shop) -> None:
    uid = make_user(shop.db, credits=1_000)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid))
    body = refunded(sid, 250)
    with _served(shop) as base:
        responses = _concurrently(
            10,
            lambda: httpx.post(
                base + "/api/stripe/webhook",
                content=body,
                headers={"Stripe-Signature": fs.sign(body, shop.secret)},
                timeout=60,
            ),
        )
    assert [r.status_code for r in responses] == [200] * 10, responses
    assert shop.balance(uid) == 1_000 + STARTER - 2_500
    assert count(shop.db, ledger_entries, ledger_entries.c.kind == "clawback") == 1
    clean(shop.db)


def test_a_refund_meeting_another_settlement_of_its_purchase_waits_for_it_and_applies_once(
    shop: Shop,
) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid))
    body = refunded(sid, 500)
    answered: list[int] = []
    worker = threading.Thread(target=lambda: answered.append(shop.deliver(body).status_code))
    with shop.db.transaction() as conn:
        # Another worker is settling this purchase: it holds the purchase's row (on SQLite,
        # the database's one write lock).
        conn.execute(
            sa.select(purchases).where(purchases.c.checkout_session_id == sid).with_for_update()
        )
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive()  # waiting its turn, not refused
        assert shop.balance(uid) == STARTER  # and nothing taken meanwhile
    worker.join(timeout=60)
    assert answered == [200]
    assert shop.balance(uid) == 0
    assert count(shop.db, ledger_entries, ledger_entries.c.kind == "clawback") == 1
    clean(shop.db)


@pytest.fixture
def pg_shop(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    empty_postgres(pg_url)
    database = Database(pg_url)
    try:
        yield make_shop(database, monkeypatch)
    finally:
        database.dispose()
        get_settings.cache_clear()


def _deliver_all_at_once(shop: Shop, bodies: list[str]) -> list[Any]:
    """Each body straight to the webhook's service, from its own thread, all released at once."""

    def deliver(body: str) -> Callable[[], Any]:
        return lambda: stripe_webhook.handle_webhook(
            shop.db, shop.settings, payload=body.encode(), signature=fs.sign(body, shop.secret)
        )

    gate = threading.Barrier(len(bodies))
    results: list[Any] = [None] * len(bodies)

    def run(i: int, job: Callable[[], Any]) -> None:
        gate.wait()
        try:
            results[i] = job()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, deliver(b))) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.mark.postgres
def test_concurrent_refund_events_of_one_purchase_on_postgres_claw_back_exactly_once(
    pg_shop: Shop,
) -> None:
    shop = pg_shop
    uid = make_user(shop.db, credits=1_000)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid))
    # Eight events (eight event ids) about the same refund of 2.50, all at once...
    results = _deliver_all_at_once(shop, [refunded(sid, 250) for _ in range(8)])
    assert [getattr(r, "outcome", r) for r in results] == ["refund_recorded"] * 8
    assert shop.balance(uid) == 1_000 + STARTER - 2_500
    # ...then eight about a second refund that brings Stripe's total to 5.00.
    results = _deliver_all_at_once(shop, [refunded(sid, 500) for _ in range(8)])
    assert [getattr(r, "outcome", r) for r in results] == ["refund_recorded"] * 8
    assert shop.balance(uid) == 1_000
    with shop.db.read() as conn:
        taken = conn.execute(
            sa.select(ledger_entries.c.amount).where(ledger_entries.c.kind == "clawback")
        ).all()
    assert sorted(row.amount for row in taken) == [-2_500, -2_500]
    purchase = shop.purchase(sid)
    assert (purchase.amount_refunded, purchase.credits_clawed_back) == (500, STARTER)
    assert purchase.credits_shortfall == 0 and not purchase.flagged
    assert count(shop.db, account_flags) == 0
    clean(shop.db)


@pytest.mark.postgres
def test_concurrent_refund_events_of_spent_credits_on_postgres_take_what_is_left_once(
    pg_shop: Shop,
) -> None:
    shop = pg_shop
    uid = make_user(shop.db)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid))
    spend(shop.db, uid, 3_000)
    bodies = [refunded(sid, 250) for _ in range(4)] + [refunded(sid, 500) for _ in range(4)]
    results = _deliver_all_at_once(shop, bodies)
    assert [getattr(r, "outcome", r) for r in results] == ["refund_recorded"] * 8
    assert shop.balance(uid) == 0  # the 2,000 left were taken back, and no more
    purchase = shop.purchase(sid)
    assert (purchase.credits_clawed_back, purchase.credits_shortfall) == (2_000, 3_000)
    assert purchase.flagged
    with shop.db.read() as conn:
        taken = conn.execute(
            sa.select(sa.func.sum(ledger_entries.c.amount)).where(
                ledger_entries.c.kind == "clawback"
            )
        ).scalar_one()
        flagged = conn.execute(
            sa.select(sa.func.sum(account_flags.c.amount)).where(
                account_flags.c.kind == "refund_shortfall"
            )
        ).scalar_one()
    assert (taken, flagged) == (-2_000, 3_000)
    clean(shop.db)


# --- what is refused ---------------------------------------------------------------------------


FORGERIES = [
    "bad signature",
    "stale timestamp",
    "future timestamp",
    "wrong secret",
    "body altered after signing",
    "missing header",
    "header without a v1 signature",
    "malformed JSON",
    "JSON that is not an event",
    "event without data.object",
    "not UTF-8",
]


def _forgery(case: str, body: str, secret: str) -> tuple[bytes | str, str | None]:
    now = int(time.time())
    no_object = '{"id": "evt_1", "type": "charge.refunded", "data": {}}'
    cases: dict[str, tuple[bytes | str, str | None]] = {
        "bad signature": (body, f"t={now},v1={'0' * 64}"),
        "stale timestamp": (body, fs.sign(body, secret, now - 301)),
        "future timestamp": (body, fs.sign(body, secret, now + 301)),
        "wrong secret": (body, fs.sign(body, "whsec_someone_else")),
        "body altered after signing": (
            body.replace('"amount_total": 500', '"amount_total": 5'),
            fs.sign(body, secret),
        ),
        "missing header": (body, None),
        "header without a v1 signature": (body, f"t={now},v0=abc"),
        "malformed JSON": ("{not json", fs.sign("{not json", secret)),
        "JSON that is not an event": ('["a"]', fs.sign('["a"]', secret)),
        "event without data.object": (no_object, fs.sign(no_object, secret)),
        "not UTF-8": (b"\xff\xfe", fs.sign(b"\xff\xfe", secret)),
    }
    return cases[case]


@pytest.mark.parametrize("case", FORGERIES)
def test_a_forged_or_broken_delivery_is_refused_with_400_and_writes_nothing(
    shop: Shop, case: str
) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    body, header = _forgery(case, completed(shop, sid, uid), shop.secret)
    response = shop.post_event(body, header)
    assert response.status_code == 400, response.text
    assert count(shop.db, stripe_events) == 0
    assert count(shop.db, ledger_entries) == 0
    assert shop.purchase(sid).status == "open"


def test_a_body_too_large_to_be_an_event_is_refused_unread(shop: Shop) -> None:
    body = "x" * 1_000_001
    assert shop.post_event(body, fs.sign(body, shop.secret)).status_code == 413
    assert count(shop.db, stripe_events) == 0


def test_a_correctly_signed_event_one_second_inside_the_window_is_accepted(shop: Shop) -> None:
    # Pins the boundary of the refusals above, in both directions.
    uid = make_user(shop.db)
    sid = shop.start(uid)
    body = completed(shop, sid, uid)
    now = int(time.time())
    assert shop.post_event(body, fs.sign(body, shop.secret, now + 280)).status_code == 200
    other = completed(shop, shop.start(uid), uid)
    assert shop.post_event(other, fs.sign(other, shop.secret, now - 280)).status_code == 200
    assert shop.balance(uid) == 2 * STARTER


def test_a_webhook_with_no_secret_configured_is_refused(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real Stripe in production without STRIPE_WEBHOOK_SECRET: no event can be trusted.
    shop = make_shop(
        db,
        monkeypatch,
        STRIPE_SECRET_KEY="sk_test_x",
        STRIPE_WEBHOOK_SECRET="",
        AICREDITS_ENV="prod",
    )
    body = fs.event("checkout.session.completed", fs.checkout_session("cs_1", user_id=1))
    assert shop.post_event(body, fs.sign(body, "")).status_code == 400
    assert count(db, stripe_events) == 0
    get_settings.cache_clear()


# --- failures half-way -------------------------------------------------------------------------


def _db_down() -> sa.exc.OperationalError:
    return sa.exc.OperationalError("UPDATE purchases ...", {}, Exception("server closed"))


def _fail_once_after(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """Make owner.name run, then fail as a lost database connection would, the first time."""
    real = getattr(owner, name)
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise _db_down()
        return result

    monkeypatch.setattr(owner, name, flaky)
    return calls


@pytest.mark.parametrize(
    "point",
    [
        "after the ledger grant",
        "after settling any refund that came first",
        "after recording the purchase",
        "just before the event is stored",
    ],
)
def test_a_database_failure_during_a_completion_returns_500_and_the_retry_applies_once(
    shop: Shop, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    if point == "after the ledger grant":
        calls = _fail_once_after(monkeypatch, ledger, "grant")
    elif point == "after settling any refund that came first":
        calls = _fail_once_after(monkeypatch, refunds, "settle_refunds")
    elif point == "after recording the purchase":
        calls = _fail_once_after(monkeypatch, stripe_webhook, "apply_parked")
    else:
        calls = _fail_once_after(monkeypatch, stripe_webhook, "_dispatch")
    body = completed(shop, sid, uid)
    assert shop.deliver(body).status_code == 500
    assert calls == [1]
    with shop.db.read() as conn:
        stored = conn.execute(sa.select(stripe_events.c.processed_at)).one()
    assert stored.processed_at is None  # not acknowledged: Stripe will retry
    retry = shop.deliver(body)
    assert retry.status_code == 200, retry.text
    assert shop.balance(uid) == STARTER
    assert shop.purchase(sid).status == "paid"
    assert count(shop.db, ledger_entries) == 1
    assert shop.deliver(body).json()["outcome"] == retry.json()["outcome"]
    assert shop.balance(uid) == STARTER
    clean(shop.db)


class _Abandoned(Exception):
    pass


@pytest.mark.parametrize("point", ["after the ledger grant", "after recording the purchase"])
def test_a_fulfilment_that_fails_after_the_ledger_write_leaves_neither_credit_nor_record(
    shop: Shop, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    owner, name = (
        (ledger, "grant") if point == "after the ledger grant" else (refunds, "settle_refunds")
    )
    real = getattr(owner, name)
    calls: list[int] = []

    def then_fail(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        calls.append(1)
        raise _Abandoned

    monkeypatch.setattr(owner, name, then_fail)
    session = stripe_api.parse_checkout_session(fs.checkout_session(sid, user_id=uid))
    with pytest.raises(_Abandoned):
        fulfilment.fulfil_checkout_session(shop.db, shop.settings, session)
    assert calls == [1]
    assert shop.balance(uid) == 0
    assert count(shop.db, ledger_entries) == 0
    purchase = shop.purchase(sid)
    assert (purchase.status, purchase.credits_granted, purchase.fulfilled_at) == ("open", 0, None)
    assert purchase.payment_intent_id is None  # what the session said was not kept either
    monkeypatch.setattr(owner, name, real)
    again = fulfilment.fulfil_checkout_session(shop.db, shop.settings, session)
    assert (again.status, again.newly_credited) == (fulfilment.FulfilmentStatus.CREDITED, True)
    assert shop.balance(uid) == STARTER
    assert shop.purchase(sid).credits_granted == STARTER
    clean(shop.db)


def test_a_database_failure_during_a_refund_returns_500_and_the_retry_takes_once(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    shop.deliver(completed(shop, sid, uid))
    calls = _fail_once_after(monkeypatch, ledger, "clawback")
    body = refunded(sid, 500)
    assert shop.deliver(body).status_code == 500
    assert calls == [1]
    # One unit of work: the clawback rolled back with the refund it was for.
    assert shop.balance(uid) == STARTER
    purchase = shop.purchase(sid)
    assert (purchase.amount_refunded, purchase.credits_clawed_back) == (0, 0)
    assert count(shop.db, ledger_entries, ledger_entries.c.kind == "clawback") == 0
    assert shop.deliver(body).status_code == 200
    purchase = shop.purchase(sid)
    assert (purchase.credits_clawed_back, purchase.credits_shortfall) == (STARTER, 0)
    assert count(shop.db, ledger_entries, ledger_entries.c.kind == "clawback") == 1
    assert count(shop.db, account_flags) == 0
    clean(shop.db)


def test_a_database_failure_while_parking_a_refund_is_retried_cleanly(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = make_user(shop.db)
    sid = shop.start(uid)
    calls = _fail_once_after(monkeypatch, stripe_webhook, "_dispatch")
    body = refunded(sid, 500)
    assert shop.deliver(body).status_code == 500
    assert calls == [1]
    assert shop.deliver(body).json()["outcome"] == "parked"
    shop.deliver(completed(shop, sid, uid))
    assert shop.balance(uid) == 0
    clean(shop.db)
