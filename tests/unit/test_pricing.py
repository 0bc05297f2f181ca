"""Credits arithmetic: integer only, every fraction of a credit rounds up."""

import pytest

from aicredits.domain.errors import InvalidAmount, InvalidRequest
from aicredits.domain.pricing import (
    Price,
    ceil_div,
    clamp_max_tokens,
    credits_per_1k,
    usage_cost,
    worst_case_cost,
)

PRICE = Price(version_id=1, model="m", input_per_mtok=2_000, output_per_mtok=8_000)


def test_a_single_token_costs_one_whole_credit_not_a_fraction() -> None:
    assert usage_cost(PRICE, input_tokens=1, output_tokens=0) == 1
    assert usage_cost(PRICE, input_tokens=0, output_tokens=1) == 1


def test_cost_rounds_up_only_the_remainder() -> None:
    # 500 * 2000 + 0 = 1_000_000 exactly -> 1 credit; one more token tips it to 2.
    assert usage_cost(PRICE, input_tokens=500, output_tokens=0) == 1
    assert usage_cost(PRICE, input_tokens=501, output_tokens=0) == 2
    # Input and output are summed before rounding, not rounded separately.
    assert usage_cost(PRICE, input_tokens=250, output_tokens=62) == 1  # 500_000 + 496_000


def test_zero_token_call_costs_nothing() -> None:
    assert usage_cost(PRICE, input_tokens=0, output_tokens=0) == 0


def test_free_model_costs_nothing_whatever_the_tokens() -> None:
    free = Price(version_id=2, model="free", input_per_mtok=0, output_per_mtok=0)
    assert usage_cost(free, input_tokens=10**9, output_tokens=10**9) == 0


def test_large_counts_stay_exact_integers() -> None:
    price = Price(version_id=3, model="big", input_per_mtok=3, output_per_mtok=7)
    cost = usage_cost(price, input_tokens=10**12 + 1, output_tokens=0)
    assert cost == 3 * 10**6 + 1
    assert isinstance(cost, int)


def test_negative_token_counts_are_refused() -> None:
    with pytest.raises(InvalidAmount):
        usage_cost(PRICE, input_tokens=-1, output_tokens=0)


def test_ceil_div_rejects_nonsense() -> None:
    assert ceil_div(0, 7) == 0
    assert ceil_div(7, 7) == 1
    assert ceil_div(8, 7) == 2
    with pytest.raises(ValueError):
        ceil_div(1, 0)
    with pytest.raises(ValueError):
        ceil_div(-1, 3)


@pytest.mark.parametrize(
    ("requested", "expected"), [(None, 1024), (1, 1), (1024, 1024), (5000, 1024)]
)
def test_max_tokens_is_clamped_to_the_model_limit(requested: int | None, expected: int) -> None:
    assert clamp_max_tokens(requested, model_limit=1024) == expected


@pytest.mark.parametrize("bad", [0, -5, True, 2.5, "100"])
def test_bad_max_tokens_is_refused_with_a_reason(bad: object) -> None:
    with pytest.raises(InvalidRequest, match="max_tokens"):
        clamp_max_tokens(bad, model_limit=1024)  # type: ignore[arg-type]


def test_worst_case_prices_every_prompt_token_and_the_whole_output_cap() -> None:
    assert worst_case_cost(PRICE, prompt_tokens=100, max_output_tokens=1000) == 9  # 8.2 -> 9
    assert worst_case_cost(PRICE, prompt_tokens=0, max_output_tokens=0) == 0


@pytest.mark.parametrize(
    ("per_mtok", "shown"), [(2000, "2"), (8000, "8"), (150, "0.15"), (1, "0.001"), (0, "0")]
)
def test_price_per_1k_is_shown_without_float_noise(per_mtok: int, shown: str) -> None:
    assert credits_per_1k(per_mtok) == shown
