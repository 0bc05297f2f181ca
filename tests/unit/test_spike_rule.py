"""The spike rule, decided in integers: the last hour against `factor` times the usual hour."""

from __future__ import annotations

from fractions import Fraction

import pytest

from aicredits.domain.spikes import BASELINE_HOURS, SpikeRule, usual_hourly, usual_hourly_text


def test_a_quiet_week_then_a_heavy_hour_is_a_spike() -> None:
    rule = SpikeRule.of(factor=5.0, min_credits=100)
    # 168 credits over the week is 1 an hour; 600 in the last hour is 600 times that.
    assert rule.is_spike(last_hour=600, previous_week=168)


def test_a_steady_spender_is_no_spike() -> None:
    rule = SpikeRule.of(factor=5.0, min_credits=100)
    # 100 an hour all week, and 300 in the last hour: 3 times the usual.
    assert not rule.is_spike(last_hour=300, previous_week=100 * BASELINE_HOURS)
    assert SpikeRule.of(factor=2.0, min_credits=100).is_spike(
        last_hour=300, previous_week=100 * BASELINE_HOURS
    )


def test_exactly_factor_times_the_usual_is_not_more_than_it() -> None:
    rule = SpikeRule.of(factor=5.0, min_credits=1)
    usual = 168 * 7  # 7 an hour
    assert not rule.is_spike(last_hour=35, previous_week=usual)
    assert rule.is_spike(last_hour=36, previous_week=usual)


def test_a_decimal_factor_is_exact_where_a_float_product_is_not() -> None:
    # In floats 0.1 * 3 > 0.3; the rule reads 0.3 as 3/10, so the line falls where written.
    rule = SpikeRule.of(factor=0.3, min_credits=1)
    assert rule.factor == Fraction(3, 10)
    # The line: last_hour * 168 > 0.3 * previous_week, here 30 * 168 against 0.3 * 16,800.
    assert not rule.is_spike(last_hour=30, previous_week=16_800)
    assert rule.is_spike(last_hour=31, previous_week=16_800)


def test_below_the_minimum_is_no_spike_and_nothing_spent_never_is() -> None:
    rule = SpikeRule.of(factor=5.0, min_credits=100)
    assert not rule.is_spike(last_hour=99, previous_week=0)
    assert rule.is_spike(last_hour=100, previous_week=0)
    no_minimum = SpikeRule.of(factor=5.0, min_credits=0)
    assert no_minimum.least_last_hour == 1
    assert not no_minimum.is_spike(last_hour=0, previous_week=0)
    assert no_minimum.is_spike(last_hour=1, previous_week=0)


def test_the_factor_must_be_positive() -> None:
    for bad in (0, -1.5, "0"):
        with pytest.raises(ValueError, match="positive"):
            SpikeRule.of(factor=bad, min_credits=1)


def test_the_usual_hour_is_exact_and_shown_to_one_decimal() -> None:
    assert usual_hourly(168) == 1
    assert usual_hourly(42) == Fraction(1, 4)
    assert usual_hourly_text(168) == "1.0"
    assert usual_hourly_text(0) == "0.0"
    assert usual_hourly_text(100 * BASELINE_HOURS + 84) == "100.5"
    assert usual_hourly_text(1_234_567 * BASELINE_HOURS) == "1,234,567.0"
    # The same digits as formatting the float, ties included.
    for previous_week in (1, 17, 42, 126, 210, 999, 123_457):
        expected = f"{previous_week / BASELINE_HOURS:,.1f}"
        assert usual_hourly_text(previous_week) == expected, previous_week
