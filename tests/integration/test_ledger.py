"""The ledger operations against a real database (SQLite and Postgres)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import (
    holds,
    ledger_entries,
    usage_events,
    utcnow,
)
from aicredits.domain.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    MissingReason,
    UnknownHold,
    UnknownUser,
)
from aicredits.services import ledger, pricing, recovery
from aicredits.services.ledger import UsageRecord
from aicredits.services.verify import verify_ledger
from aicredits.settings import DEFAULT_MODELS
from tests.factories import make_user, new_key


def entries(db: Database, user_id: int) -> list[tuple[str, int, int]]:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(
                ledger_entries.c.kind, ledger_entries.c.amount, ledger_entries.c.balance_after
            )
            .where(ledger_entries.c.user_id == user_id)
            .order_by(ledger_entries.c.id)
        ).all()
    return [(r.kind, r.amount, r.balance_after) for r in rows]


def usage(db: Database) -> UsageRecord:
    pricing.seed_prices(db, DEFAULT_MODELS)
    price = pricing.current_price(db, model=DEFAULT_MODELS[0].id)
    return UsageRecord(
        model=price.model, price_version_id=price.version_id, input_tokens=10, output_tokens=20
    )


# --- grant ---------------------------------------------------------------------------------


def test_grant_adds_credits_and_appends_one_entry(db: Database) -> None:
    user = make_user(db)
    result = ledger.grant(db, user_id=user, credits=100, key="g1", reason="welcome")
    assert (result.amount, result.balance_after, result.replayed) == (100, 100, False)
    assert ledger.get_balance(db, user_id=user).balance == 100
    assert entries(db, user) == [("grant", 100, 100)]


def test_grant_replayed_with_the_same_key_changes_nothing(db: Database) -> None:
    user = make_user(db)
    first = ledger.grant(db, user_id=user, credits=100, key="same", reason="welcome")
    again = ledger.grant(db, user_id=user, credits=100, key="same", reason="welcome")
    assert again.replayed
    assert again.entry_id == first.entry_id
    assert ledger.get_balance(db, user_id=user).balance == 100
    assert len(entries(db, user)) == 1


def test_a_key_reused_for_a_different_grant_is_refused(db: Database) -> None:
    user = make_user(db)
    other = make_user(db)
    ledger.grant(db, user_id=user, credits=100, key="k", reason="r")
    with pytest.raises(IdempotencyConflict):
        ledger.grant(db, user_id=user, credits=999, key="k", reason="r")
    with pytest.raises(IdempotencyConflict):
        ledger.grant(db, user_id=other, credits=100, key="k", reason="r")
    assert ledger.get_balance(db, user_id=other).balance == 0
    assert ledger.get_balance(db, user_id=user).balance == 100


@pytest.mark.parametrize("credits", [0, -5])
def test_grant_of_zero_or_less_is_refused(db: Database, credits: int) -> None:
    user = make_user(db)
    with pytest.raises(InvalidAmount):
        ledger.grant(db, user_id=user, credits=credits, key=new_key(), reason="r")
    assert entries(db, user) == []


def test_grant_without_a_reason_is_refused(db: Database) -> None:
    user = make_user(db)
    with pytest.raises(MissingReason):
        ledger.grant(db, user_id=user, credits=5, key=new_key(), reason="  ")


def test_grant_to_an_unknown_user_is_refused(db: Database) -> None:
    with pytest.raises(UnknownUser):
        ledger.grant(db, user_id=4242, credits=5, key=new_key(), reason="r")


def test_grant_expiring_in_the_past_is_refused(db: Database) -> None:
    user = make_user(db)
    with pytest.raises(InvalidAmount, match="future"):
        ledger.grant(
            db,
            user_id=user,
            credits=5,
            key=new_key(),
            reason="r",
            expires_at=utcnow() - timedelta(seconds=1),
        )


# --- reserve / settle / release --------------------------------------------------------------


def test_reserve_holds_credits_without_spending_them(db: Database) -> None:
    user = make_user(db, credits=100)
    hold = ledger.reserve(db, user_id=user, credits=30, request_id="r1")
    bal = ledger.get_balance(db, user_id=user)
    assert (bal.balance, bal.held, bal.available) == (100, 30, 70)
    assert hold.status == "pending"
    assert len(entries(db, user)) == 1  # a hold is not a balance change


def test_reserve_more_than_available_is_refused_with_the_amounts(db: Database) -> None:
    user = make_user(db, credits=100)
    ledger.reserve(db, user_id=user, credits=80, request_id="r1")
    with pytest.raises(InsufficientCredits) as caught:
        ledger.reserve(db, user_id=user, credits=21, request_id="r2")
    assert (caught.value.available, caught.value.needed) == (20, 21)
    with db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(holds)).scalar_one() == 1
    assert ledger.get_balance(db, user_id=user).held == 80


def test_reserve_exactly_the_available_credits_succeeds(db: Database) -> None:
    user = make_user(db, credits=100)
    ledger.reserve(db, user_id=user, credits=100, request_id="all")
    assert ledger.get_balance(db, user_id=user).available == 0


def test_reserve_replayed_with_the_same_request_id_returns_the_first_hold(db: Database) -> None:
    user = make_user(db, credits=100)
    first = ledger.reserve(db, user_id=user, credits=30, request_id="r1")
    again = ledger.reserve(db, user_id=user, credits=30, request_id="r1")
    assert again.replayed and again.id == first.id
    assert ledger.get_balance(db, user_id=user).held == 30
    with pytest.raises(IdempotencyConflict):
        ledger.reserve(db, user_id=user, credits=31, request_id="r1")


def test_reserve_for_an_unknown_user_is_refused(db: Database) -> None:
    with pytest.raises(UnknownUser):
        ledger.reserve(db, user_id=999, credits=1, request_id="r")


def test_settle_charges_actual_usage_and_returns_the_rest(db: Database) -> None:
    user = make_user(db, credits=100)
    hold = ledger.reserve(db, user_id=user, credits=30, request_id="r1")
    result = ledger.settle(db, hold=hold.id, actual_credits=12, usage=usage(db))
    assert (result.charged, result.unbilled, result.applied) == (12, 0, True)
    assert result.balance_after == 88
    bal = ledger.get_balance(db, user_id=user)
    assert (bal.balance, bal.held) == (88, 0)
    assert entries(db, user)[-1] == ("spend", -12, 88)
    with db.read() as conn:
        event = conn.execute(sa.select(usage_events)).one()
    assert (event.cost, event.charged, event.unbilled, event.request_id) == (12, 12, 0, "r1")
    assert event.price_version_id == result_price_version(db)


def result_price_version(db: Database) -> int:
    return pricing.current_price(db, model=DEFAULT_MODELS[0].id).version_id


def test_settle_above_the_hold_charges_the_hold_and_records_the_overage(db: Database) -> None:
    user = make_user(db, credits=100)
    hold = ledger.reserve(db, user_id=user, credits=30, request_id="r1")
    result = ledger.settle(db, hold=hold.id, actual_credits=45, usage=usage(db))
    assert (result.charged, result.unbilled) == (30, 15)
    bal = ledger.get_balance(db, user_id=user)
    assert (bal.balance, bal.held) == (70, 0)
    with db.read() as conn:
        event = conn.execute(sa.select(usage_events)).one()
    assert (event.cost, event.charged, event.unbilled) == (45, 30, 15)


def test_settle_of_a_zero_cost_call_charges_nothing_and_writes_no_entry(db: Database) -> None:
    user = make_user(db, credits=100)
    hold = ledger.reserve(db, user_id=user, credits=30, request_id="r1")
    result = ledger.settle(db, hold=hold.id, actual_credits=0, usage=usage(db))
    assert (result.charged, result.applied) == (0, True)
    bal = ledger.get_balance(db, user_id=user)
    assert (bal.balance, bal.held) == (100, 0)
    assert [e[0] for e in entries(db, user)] == ["grant"]


def test_settle_twice_charges_once(db: Database) -> None:
    user = make_user(db, credits=100)
    hold = ledger.reserve(db, user_id=user, credits=30, request_id="r1")
    ledger.settle(db, hold=hold.id, actual_credits=10, usage=usage(db))
    again = ledger.settle(db, hold=hold.id, actual_credits=10, usage=usage(db))
    assert not again.applied
    assert again.charged == 10
    assert ledger.get_balance(db, user_id=user).balance == 90


def test_release_returns_the_hold_and_charges_nothing(db: Database) -> None:
    user = make_user(db, credits=100)
    hold = ledger.reserve(db, user_id=user, credits=30, request_id="r1")
    released = ledger.release(db, hold_id=hold.id)
    assert released.status == "released"
    bal = ledger.get_balance(db, user_id=user)
    assert (bal.balance, bal.held) == (100, 0)
    assert ledger.release(db, hold_id=hold.id).status == "released"  # idempotent
    assert ledger.get_balance(db, user_id=user).held == 0


def test_release_after_settle_changes_nothing(db: Database) -> None:
    user = make_user(db, credits=100)
    hold = ledger.reserve(db, user_id=user, credits=30, request_id="r1")
    ledger.settle(db, hold=hold.id, actual_credits=10)
    assert ledger.release(db, hold_id=hold.id).status == "settled"
    bal = ledger.get_balance(db, user_id=user)
    assert (bal.balance, bal.held) == (90, 0)


def test_settle_after_release_charges_nothing_but_keeps_the_usage_on_record(db: Database) -> None:
    user = make_user(db, credits=100)
    hold = ledger.reserve(db, user_id=user, credits=30, request_id="r1")
    ledger.release(db, hold_id=hold.id)
    late = ledger.settle(db, hold=hold.id, actual_credits=10, usage=usage(db))
    assert (late.applied, late.charged, late.unbilled) == (False, 0, 10)
    assert ledger.get_balance(db, user_id=user).balance == 100
    with db.read() as conn:
        event = conn.execute(sa.select(usage_events)).one()
    assert (event.charged, event.unbilled) == (0, 10)


def test_unknown_hold_is_reported(db: Database) -> None:
    with pytest.raises(UnknownHold):
        ledger.settle(db, hold=12345, actual_credits=1)
    with pytest.raises(UnknownHold):
        ledger.release(db, hold_id=12345)


# --- adjust ------------------------------------------------------------------------------------


def test_adjust_up_and_down_with_actor_and_reason(db: Database) -> None:
    user = make_user(db, credits=100)
    ledger.adjust(db, user_id=user, credits=-40, key="a1", actor="admin:1", reason="mistake")
    ledger.adjust(db, user_id=user, credits=5, key="a2", actor="admin:1", reason="goodwill")
    assert entries(db, user)[1:] == [("adjustment", -40, 60), ("adjustment", 5, 65)]
    with db.read() as conn:
        row = conn.execute(
            sa.select(ledger_entries).where(ledger_entries.c.idempotency_key == "a1")
        ).one()
    assert (row.actor, row.reason) == ("admin:1", "mistake")


def test_adjust_can_never_take_the_balance_below_zero_or_below_what_is_held(
    db: Database,
) -> None:
    user = make_user(db, credits=100)
    with pytest.raises(InsufficientCredits):
        ledger.adjust(db, user_id=user, credits=-101, key=new_key(), actor="a", reason="r")
    ledger.reserve(db, user_id=user, credits=30, request_id="r1")
    with pytest.raises(InsufficientCredits) as caught:
        ledger.adjust(db, user_id=user, credits=-71, key=new_key(), actor="a", reason="r")
    assert caught.value.available == 70
    assert ledger.get_balance(db, user_id=user).balance == 100


def test_adjust_needs_a_reason_an_actor_and_a_nonzero_amount(db: Database) -> None:
    user = make_user(db, credits=10)
    with pytest.raises(MissingReason):
        ledger.adjust(db, user_id=user, credits=1, key=new_key(), actor="a", reason="")
    with pytest.raises(InvalidAmount):
        ledger.adjust(db, user_id=user, credits=1, key=new_key(), actor="", reason="r")
    with pytest.raises(InvalidAmount):
        ledger.adjust(db, user_id=user, credits=0, key=new_key(), actor="a", reason="r")


def test_adjust_replayed_applies_once(db: Database) -> None:
    user = make_user(db, credits=100)
    for _ in range(3):
        ledger.adjust(db, user_id=user, credits=-10, key="form-1", actor="a", reason="r")
    assert ledger.get_balance(db, user_id=user).balance == 90


# --- expiry ------------------------------------------------------------------------------------


def test_spending_takes_the_soonest_expiring_grant_first(db: Database) -> None:
    now = utcnow()
    user = make_user(db, credits=50)  # never expires
    late = ledger.grant(
        db, user_id=user, credits=20, key="late", reason="r", expires_at=now + timedelta(days=9)
    )
    soon = ledger.grant(
        db, user_id=user, credits=10, key="soon", reason="r", expires_at=now + timedelta(days=1)
    )
    hold = ledger.reserve(db, user_id=user, credits=15, request_id="r1")
    ledger.settle(db, hold=hold.id, actual_credits=15)
    # The soon-expiring 10 are gone; 5 came out of the later grant; the 50 are untouched.
    assert ledger.expiring_credits(db, user_id=user) == [(now + timedelta(days=9), 15)]
    assert (soon.amount, late.amount) == (10, 20)

    # After both dates pass, only the unspent 15 leaves; the 50 purchased credits stay.
    report = ledger.expire_due_grants(db, now=now + timedelta(days=10))
    assert (report.lots_touched, report.credits_expired) == (1, 15)
    assert ledger.get_balance(db, user_id=user).balance == 50
    assert entries(db, user)[-1] == ("expiry", -15, 50)


def test_expiry_happens_exactly_once(db: Database) -> None:
    now = utcnow()
    user = make_user(db)
    ledger.grant(
        db, user_id=user, credits=20, key="g", reason="trial", expires_at=now + timedelta(hours=1)
    )
    assert ledger.expire_due_grants(db, now=now).credits_expired == 0  # not yet due
    later = now + timedelta(hours=2)
    assert ledger.expire_due_grants(db, now=later).credits_expired == 20
    assert ledger.expire_due_grants(db, now=later).credits_expired == 0
    assert ledger.get_balance(db, user_id=user).balance == 0
    assert [e[0] for e in entries(db, user)] == ["grant", "expiry"]


def test_expiry_leaves_credits_held_by_an_in_flight_call_until_it_finishes(db: Database) -> None:
    now = utcnow()
    user = make_user(db)
    ledger.grant(
        db, user_id=user, credits=20, key="g", reason="trial", expires_at=now + timedelta(hours=1)
    )
    hold = ledger.reserve(db, user_id=user, credits=8, request_id="r1", now=now)
    later = now + timedelta(hours=2)
    assert ledger.expire_due_grants(db, now=later).credits_expired == 12
    # The call settles for 5: paid from the expiring grant; the 3 left over expire next run.
    ledger.settle(db, hold=hold.id, actual_credits=5, now=later)
    assert ledger.expire_due_grants(db, now=later).credits_expired == 3
    bal = ledger.get_balance(db, user_id=user)
    assert (bal.balance, bal.held) == (0, 0)
    assert verify_ledger(db) == []


# --- leases: holds whose worker died ------------------------------------------------------------


def priced(db: Database, *, input_tokens: int = 10) -> ledger.HoldPricing:
    pricing.seed_prices(db, DEFAULT_MODELS)
    price = pricing.current_price(db, model=DEFAULT_MODELS[0].id)
    return ledger.HoldPricing(
        model=price.model, price_version_id=price.version_id, input_tokens=input_tokens
    )


def test_only_holds_whose_lease_lapsed_are_reclaimed_and_a_late_worker_charges_nothing(
    db: Database,
) -> None:
    now = utcnow()
    user = make_user(db, credits=100)
    stale = ledger.reserve(
        db, user_id=user, credits=30, request_id="old", lease=timedelta(minutes=1), now=now
    )
    fresh = ledger.reserve(
        db, user_id=user, credits=20, request_id="new", lease=timedelta(hours=1), now=now
    )
    later = now + timedelta(minutes=5)
    assert [h.id for h in ledger.lapsed_holds(db, now=later)] == [stale.id]
    assert recovery.reclaim_lapsed_holds(db, now=later).holds_released == 1
    assert ledger.get_hold(db, hold_id=stale.id).status == "expired"
    assert ledger.get_hold(db, hold_id=fresh.id).status == "pending"
    assert ledger.get_balance(db, user_id=user).held == 20
    assert recovery.reclaim_lapsed_holds(db, now=later).holds == 0
    # The crashed worker comes back late: nothing is charged.
    late = ledger.settle(db, hold=stale.id, actual_credits=7)
    assert not late.applied
    assert ledger.get_balance(db, user_id=user).balance == 100
    assert verify_ledger(db) == []


def test_a_renewed_lease_keeps_a_hold_from_the_sweeper(db: Database) -> None:
    now = utcnow()
    user = make_user(db, credits=100)
    hold = ledger.reserve(
        db, user_id=user, credits=30, request_id="live", lease=timedelta(seconds=30), now=now
    )
    with db.transaction() as conn:
        ledger.renew_leases(conn, hold_ids=[hold.id], until=now + timedelta(minutes=10))
    assert ledger.lapsed_holds(db, now=now + timedelta(minutes=5)) == []
    assert ledger.lapsed_holds(db, now=now + timedelta(minutes=11)) != []


def test_a_dead_workers_hold_is_charged_for_its_last_checkpoint_never_more(db: Database) -> None:
    now = utcnow()
    user = make_user(db, credits=1_000)
    terms = priced(db, input_tokens=100)
    hold = ledger.reserve(
        db, user_id=user, credits=500, request_id="crashed", lease=timedelta(seconds=30),
        pricing=terms, now=now,
    )  # fmt: skip
    with db.transaction() as conn:
        assert ledger.record_progress(
            conn, hold_id=hold.id, delivered_tokens=40, until=now + timedelta(seconds=30), now=now
        )
        # A late, smaller count (a retried checkpoint) never lowers what was recorded.
        ledger.record_progress(
            conn, hold_id=hold.id, delivered_tokens=25, until=now + timedelta(seconds=30), now=now
        )
    assert ledger.get_hold(db, hold_id=hold.id).delivered_tokens == 40
    assert recovery.reclaim_lapsed_holds(db, now=now + timedelta(seconds=10)).holds == 0
    report = recovery.reclaim_lapsed_holds(db, now=now + timedelta(seconds=31))
    price = pricing.price_version(db, version_id=terms.price_version_id)
    expected = -(-(100 * price.input_per_mtok + 40 * price.output_per_mtok) // 1_000_000)
    assert (report.holds_settled, report.credits_charged) == (1, expected)
    settled = ledger.get_hold(db, hold_id=hold.id)
    assert (settled.status, settled.charged) == ("settled", expected)
    assert ledger.get_balance(db, user_id=user) == ledger.Balance(user, 1_000 - expected, 0)
    with db.read() as conn:
        event = conn.execute(
            sa.select(usage_events).where(usage_events.c.request_id == "crashed")
        ).one()
    assert (event.outcome, event.output_tokens, event.estimated) == ("lost", 40, True)
    # The worker was not dead after all: its settle changes nothing.
    assert not ledger.settle(db, hold=hold.id, actual_credits=999).applied
    assert verify_ledger(db) == []


def test_a_dead_workers_charge_never_exceeds_the_hold(db: Database) -> None:
    now = utcnow()
    user = make_user(db, credits=1_000)
    hold = ledger.reserve(
        db, user_id=user, credits=3, request_id="small", lease=timedelta(seconds=1),
        pricing=priced(db, input_tokens=10_000), now=now,
    )  # fmt: skip
    with db.transaction() as conn:
        ledger.record_progress(
            conn, hold_id=hold.id, delivered_tokens=50_000, until=now + timedelta(seconds=1),
            now=now,
        )  # fmt: skip
    report = recovery.reclaim_lapsed_holds(db, now=now + timedelta(seconds=2))
    assert report.credits_charged == 3
    assert ledger.get_balance(db, user_id=user).balance == 997
    assert verify_ledger(db) == []


def test_the_sweeper_leaves_a_hold_renewed_after_it_looked(db: Database) -> None:
    now = utcnow()
    user = make_user(db, credits=100)
    hold = ledger.reserve(
        db, user_id=user, credits=30, request_id="racing", lease=timedelta(seconds=1),
        pricing=priced(db), now=now,
    )  # fmt: skip
    with db.transaction() as conn:
        ledger.record_progress(
            conn, hold_id=hold.id, delivered_tokens=5, until=now + timedelta(seconds=1), now=now
        )
    (seen,) = ledger.lapsed_holds(db, now=now + timedelta(seconds=2))
    with db.transaction() as conn:  # the worker was only slow: it renews now
        ledger.renew_leases(conn, hold_ids=[hold.id], until=now + timedelta(minutes=1))
    result = ledger.settle(
        db, hold=seen, actual_credits=10, now=now + timedelta(seconds=2), only_if_lapsed=True
    )
    assert not result.applied
    assert ledger.get_hold(db, hold_id=hold.id).status == "pending"
    assert not ledger.expire_lapsed_hold(db, hold_id=hold.id, now=now + timedelta(seconds=2))
    assert ledger.get_balance(db, user_id=user) == ledger.Balance(user, 100, 30)


# --- the ledger is append-only -----------------------------------------------------------------


def test_the_database_refuses_to_edit_or_delete_ledger_entries(db: Database) -> None:
    user = make_user(db, credits=10)
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), db.transaction() as conn:
        conn.execute(sa.update(ledger_entries).values(amount=1_000_000))
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), db.transaction() as conn:
        conn.execute(sa.delete(ledger_entries))
    assert entries(db, user) == [("grant", 10, 10)]


def test_verify_ledger_is_clean_after_a_mixed_history(db: Database) -> None:
    user = make_user(db, credits=100)
    h1 = ledger.reserve(db, user_id=user, credits=30, request_id="a")
    h2 = ledger.reserve(db, user_id=user, credits=30, request_id="b")
    ledger.settle(db, hold=h1.id, actual_credits=40)
    ledger.release(db, hold_id=h2.id)
    ledger.adjust(db, user_id=user, credits=-5, key="adj", actor="a", reason="r")
    assert verify_ledger(db) == []


# --- clawback ----------------------------------------------------------------------------------


def test_clawback_takes_back_up_to_the_balance_and_reports_the_shortfall(db: Database) -> None:
    user = make_user(db, credits=100)
    full = ledger.clawback(db, user_id=user, credits=30, key="refund-1", reason="refund")
    assert (full.taken, full.shortfall) == (30, 0)
    partial = ledger.clawback(db, user_id=user, credits=100, key="refund-2", reason="refund")
    assert (partial.taken, partial.shortfall) == (70, 30)
    assert ledger.get_balance(db, user_id=user).balance == 0
    assert entries(db, user)[-2:] == [("clawback", -30, 70), ("clawback", -70, 0)]
    assert verify_ledger(db) == []


def test_clawback_replayed_takes_once(db: Database) -> None:
    user = make_user(db, credits=100)
    first = ledger.clawback(db, user_id=user, credits=40, key="refund-x", reason="refund")
    again = ledger.clawback(db, user_id=user, credits=40, key="refund-x", reason="refund")
    assert again.entry is not None and again.entry.replayed
    assert (first.taken, again.taken) == (40, 40)
    assert ledger.get_balance(db, user_id=user).balance == 60


def test_clawback_leaves_credits_held_by_a_call_in_flight(db: Database) -> None:
    user = make_user(db, credits=100)
    ledger.reserve(db, user_id=user, credits=90, request_id="busy")
    result = ledger.clawback(db, user_id=user, credits=50, key="refund-y", reason="refund")
    assert (result.taken, result.shortfall) == (10, 40)
    assert ledger.get_balance(db, user_id=user).available == 0


def test_clawback_of_an_empty_account_writes_nothing(db: Database) -> None:
    user = make_user(db)
    result = ledger.clawback(db, user_id=user, credits=50, key="refund-z", reason="refund")
    assert (result.entry, result.taken, result.shortfall) == (None, 0, 50)
    assert entries(db, user) == []


# --- a unit of work: ledger writes inside the caller's transaction -----------------------------


class _Abandoned(Exception):
    pass


def test_writes_given_the_callers_connection_commit_or_roll_back_with_it(db: Database) -> None:
    user = make_user(db)
    with pytest.raises(_Abandoned), db.transaction() as conn:
        ledger.grant(conn, user_id=user, credits=100, key="uow:1", reason="in a unit of work")
        ledger.adjust(conn, user_id=user, credits=-30, key="uow:2", actor="t", reason="fix")
        raise _Abandoned  # the caller's own step fails: nothing of it stays
    assert ledger.get_balance(db, user_id=user).balance == 0
    assert entries(db, user) == []
    with db.transaction() as conn:
        ledger.grant(conn, user_id=user, credits=100, key="uow:1", reason="in a unit of work")
        taken = ledger.clawback(conn, user_id=user, credits=30, key="uow:3", reason="refund")
        assert taken.taken == 30
    assert entries(db, user) == [("grant", 100, 100), ("clawback", -30, 70)]
    assert verify_ledger(db) == []


def test_a_replayed_key_inside_a_unit_of_work_undoes_only_itself(db: Database) -> None:
    user = make_user(db)
    ledger.grant(db, user_id=user, credits=100, key="first", reason="first")
    with db.transaction() as conn:
        again = ledger.grant(conn, user_id=user, credits=100, key="first", reason="first")
        fresh = ledger.grant(conn, user_id=user, credits=5, key="second", reason="second")
        with pytest.raises(IdempotencyConflict):
            ledger.grant(conn, user_id=user, credits=7, key="first", reason="other")
    assert again.replayed and not fresh.replayed
    assert ledger.get_balance(db, user_id=user).balance == 105
    assert entries(db, user) == [("grant", 100, 100), ("grant", 5, 105)]
    assert verify_ledger(db) == []
