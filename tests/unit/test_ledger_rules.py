"""Pure ledger rules: settlement split, lot order, expiry with holds, invariant checks."""

from datetime import UTC, datetime, timedelta

import pytest

from aicredits.domain.errors import InvalidAmount, MissingReason
from aicredits.domain.ledger import (
    AccountSnapshot,
    EntryKind,
    EntryView,
    LedgerLine,
    LotGrant,
    account_violations,
    chain_violations,
    expiry_take,
    lot_reference,
    lot_remaining,
    require_key,
    require_nonzero,
    require_positive,
    require_reason,
    sign_matches_kind,
    split_settlement,
)


def test_settle_below_the_hold_charges_actual_and_returns_the_rest() -> None:
    s = split_settlement(hold_amount=10, actual=4)
    assert (s.charged, s.unbilled) == (4, 0)


def test_settle_above_the_hold_charges_the_hold_and_records_overage_as_unbilled() -> None:
    s = split_settlement(hold_amount=10, actual=13)
    assert (s.charged, s.unbilled) == (10, 3)


def test_settle_of_a_zero_token_call_charges_nothing() -> None:
    s = split_settlement(hold_amount=10, actual=0)
    assert (s.charged, s.unbilled) == (0, 0)


def test_settle_refuses_negative_usage() -> None:
    with pytest.raises(InvalidAmount):
        split_settlement(hold_amount=10, actual=-1)


T = datetime(2030, 1, 1, tzinfo=UTC)


def lot(lot_id: int, entry_id: int, amount: int, days: int) -> LotGrant:
    return LotGrant(id=lot_id, entry_id=entry_id, amount=amount, expires_at=T + timedelta(days))


def line(entry_id: int, kind: str, amount: int, reference: str | None = None) -> LedgerLine:
    return LedgerLine(id=entry_id, kind=kind, amount=amount, reference=reference)


def test_spending_takes_the_soonest_expiring_grant_first_and_spills_over() -> None:
    lots = [lot(1, 10, 20, days=9), lot(2, 11, 5, days=1)]
    lines = [line(10, "grant", 20), line(11, "grant", 5), line(12, "spend", -12)]
    assert lot_remaining(lots, lines) == {2: 0, 1: 13}


def test_non_expiring_credits_are_used_only_after_every_expiring_grant() -> None:
    lots = [lot(1, 11, 10, days=3)]
    lines = [line(10, "purchase", 100), line(11, "grant", 10), line(12, "spend", -4)]
    assert lot_remaining(lots, lines) == {1: 6}


def test_a_spend_before_a_grant_does_not_touch_that_grant() -> None:
    lots = [lot(1, 12, 10, days=3)]
    lines = [line(10, "purchase", 100), line(11, "spend", -50), line(12, "grant", 10)]
    assert lot_remaining(lots, lines) == {1: 10}


def test_an_expiry_entry_takes_only_from_the_lot_it_names() -> None:
    lots = [lot(1, 10, 10, days=1), lot(2, 11, 10, days=5)]
    lines = [
        line(10, "grant", 10),
        line(11, "grant", 10),
        line(12, "expiry", -7, lot_reference(1)),
        line(13, "spend", -5),  # 3 left in lot 1, then 2 from lot 2
    ]
    assert lot_remaining(lots, lines) == {1: 0, 2: 8}


def test_credits_beyond_every_lot_come_from_the_rest_of_the_balance() -> None:
    lots = [lot(1, 10, 3, days=1)]
    lines = [line(9, "purchase", 50), line(10, "grant", 3), line(11, "spend", -40)]
    assert lot_remaining(lots, lines) == {1: 0}


def test_expiry_takes_the_whole_rest_when_nothing_is_reserved() -> None:
    assert expiry_take(lot_remaining=30, available=100) == 30


def test_expiry_leaves_reserved_credits_for_the_in_flight_call() -> None:
    assert expiry_take(lot_remaining=30, available=12) == 12
    assert expiry_take(lot_remaining=30, available=0) == 0


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_grants_must_be_positive_whole_numbers(bad: object) -> None:
    with pytest.raises(InvalidAmount):
        require_positive(bad)  # type: ignore[arg-type]


def test_adjustments_of_zero_are_refused() -> None:
    with pytest.raises(InvalidAmount):
        require_nonzero(0)
    assert require_nonzero(-3) == -3


@pytest.mark.parametrize("bad", [None, "", "   "])
def test_a_reason_is_required(bad: str | None) -> None:
    with pytest.raises(MissingReason):
        require_reason(bad)


def test_reason_and_key_are_trimmed_and_bounded() -> None:
    assert require_reason("  promo  ") == "promo"
    with pytest.raises(MissingReason):
        require_reason("x" * 501)
    with pytest.raises(InvalidAmount):
        require_key("k" * 201)
    with pytest.raises(InvalidAmount):
        require_key("")


def test_entry_signs_fit_their_kinds() -> None:
    assert sign_matches_kind(EntryKind.GRANT, 5)
    assert not sign_matches_kind(EntryKind.GRANT, -5)
    assert sign_matches_kind(EntryKind.SPEND, -5)
    assert not sign_matches_kind(EntryKind.SPEND, 5)
    assert sign_matches_kind(EntryKind.ADJUSTMENT, -5)
    assert sign_matches_kind(EntryKind.ADJUSTMENT, 5)
    assert not sign_matches_kind(EntryKind.ADJUSTMENT, 0)


def _healthy(**changes: int | None) -> AccountSnapshot:
    base: dict[str, int | None] = dict(
        user_id=1,
        balance=100,
        held=10,
        ledger_sum=100,
        last_balance_after=100,
        pending_holds_sum=10,
        expiring_sum=50,
    )
    base.update(changes)
    return AccountSnapshot(**base)  # type: ignore[arg-type]


def test_a_healthy_account_has_no_violations() -> None:
    assert account_violations(_healthy()) == []


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        (
            {
                "balance": -1,
                "ledger_sum": -1,
                "last_balance_after": -1,
                "held": 0,
                "pending_holds_sum": 0,
                "expiring_sum": 0,
            },
            "negative",
        ),
        ({"held": 101, "pending_holds_sum": 101}, "exceeds balance"),
        ({"ledger_sum": 99}, "sum of ledger amounts"),
        ({"last_balance_after": 98}, "balance_after"),
        ({"pending_holds_sum": 11}, "pending holds"),
        ({"expiring_sum": 101}, "expiring credits"),
    ],
)
def test_each_broken_invariant_is_named(changes: dict[str, int], fragment: str) -> None:
    problems = account_violations(_healthy(**changes))
    assert problems, changes
    assert fragment in problems[0]


def test_chain_check_finds_a_wrong_running_balance_and_a_wrong_sign() -> None:
    good = [
        EntryView(id=1, kind="grant", amount=10, balance_after=10),
        EntryView(id=2, kind="spend", amount=-4, balance_after=6),
    ]
    assert chain_violations(1, good) == []
    bad_running = [*good, EntryView(id=3, kind="grant", amount=1, balance_after=8)]
    assert "running 7" in chain_violations(1, bad_running)[0]
    bad_sign = [EntryView(id=1, kind="spend", amount=5, balance_after=5)]
    assert "does not fit kind spend" in chain_violations(1, bad_sign)[0]
    unknown = [EntryView(id=1, kind="gift", amount=5, balance_after=5)]
    assert "unknown kind" in chain_violations(1, unknown)[0]
