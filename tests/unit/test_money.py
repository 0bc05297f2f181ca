"""Money arithmetic: amounts shown in their currency's units, refunds taking back what they
bought (rounded up, cumulative, never more than the pack), credits valued at a pack's rate."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from aicredits.domain.money import clawback_target, credits_worth, format_money, refund_due
from aicredits.settings import CreditPack


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        (500, "usd", "5.00 USD"),
        (123_456, "eur", "1,234.56 EUR"),
        (5, "usd", "0.05 USD"),
        (500, "jpy", "500 JPY"),  # no minor unit
        (1_500, "kwd", "1.500 KWD"),  # three decimals
    ],
)
def test_prices_are_shown_in_the_currencys_own_units(
    amount: int, currency: str, shown: str
) -> None:
    assert format_money(amount, currency) == shown


def test_an_upper_case_currency_is_shown_in_the_same_units() -> None:
    assert format_money(1_500, "KWD") == "1.500 KWD"
    assert format_money(500, "JPY") == "500 JPY"


def test_a_refund_takes_back_what_its_part_of_the_payment_bought_rounded_up() -> None:
    # 1,000 credits for 3.00: a cent bought 3 1/3 credits.
    assert clawback_target(credits=1_000, amount=300, amount_refunded=1) == 4
    assert clawback_target(credits=1_000, amount=300, amount_refunded=2) == 7  # not 4 + 4
    assert clawback_target(credits=5_000, amount=500, amount_refunded=150) == 1_500


def test_a_full_or_larger_refund_takes_exactly_the_pack() -> None:
    assert clawback_target(credits=1_000, amount=300, amount_refunded=300) == 1_000
    assert clawback_target(credits=1_000, amount=300, amount_refunded=10_000) == 1_000


@pytest.mark.parametrize(
    ("credits", "amount", "amount_refunded", "target"),
    [
        (0, 500, 500, 0),  # nothing credited yet: nothing to take back
        (5_000, 500, 0, 0),  # nothing refunded
        (5_000, 0, 1, 5_000),  # a free pack refunded at all is refunded whole
    ],
)
def test_the_edges_of_what_a_refund_takes_back(
    credits: int, amount: int, amount_refunded: int, target: int
) -> None:
    assert clawback_target(credits=credits, amount=amount, amount_refunded=amount_refunded) == (
        target
    )


def test_what_a_refund_still_calls_for_leaves_out_what_was_settled_before() -> None:
    due = refund_due(
        credits_granted=5_000, amount=500, amount_refunded=400, clawed_back=1_000, shortfall=500
    )
    assert due == 4_000 - 1_500


def test_a_refund_settled_in_full_calls_for_nothing_more() -> None:
    settled = refund_due(
        credits_granted=5_000, amount=500, amount_refunded=500, clawed_back=1_000, shortfall=4_000
    )
    assert settled == 0


def test_a_refund_before_the_pack_is_credited_calls_for_nothing() -> None:
    assert (
        refund_due(credits_granted=0, amount=500, amount_refunded=500, clawed_back=0, shortfall=0)
        == 0
    )


@dataclass(frozen=True)
class _Pack:
    credits: int
    amount: int
    currency: str


def test_credits_are_valued_at_the_first_pack_priced_in_money() -> None:
    packs = [_Pack(credits=22_000, amount=0, currency="usd"), _Pack(5_000, 500, "usd")]
    assert credits_worth(5_200, packs) == "5.20 USD"
    assert credits_worth(2_500, packs) == "2.50 USD"
    assert credits_worth(0, packs) == "0.00 USD"


def test_credits_are_valued_at_the_configured_packs_rate() -> None:
    packs = [CreditPack(id="yen", credits=1_000, amount=150, currency="jpy")]
    assert credits_worth(10_000, packs) == "1,500 JPY"


def test_credits_have_no_money_value_when_no_pack_has_a_plain_price() -> None:
    assert credits_worth(5_000, [CreditPack(id="p", credits=5_000, price_id="price_1")]) == ""
    assert credits_worth(5_000, []) == ""
