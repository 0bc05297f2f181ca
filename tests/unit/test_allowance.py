"""The current allowance and its thresholds: exact integer arithmetic."""

import pytest

from aicredits.domain.allowance import Share, allowance, banner_text, crossed, level, share


def test_no_top_up_means_no_allowance() -> None:
    a = allowance(top_up_entry_id=None, size_after_top_up=0, balance=0)
    assert (a.entry_id, a.size, a.used) == (None, 0, 0)
    assert crossed(a, [50, 80, 100]) == []


def test_used_is_what_left_the_balance_since_the_top_up() -> None:
    a = allowance(top_up_entry_id=7, size_after_top_up=1_000, balance=400)
    assert (a.size, a.used, a.remaining, a.percent_used) == (1_000, 600, 400, 60)


def test_thresholds_are_reached_exactly_not_early() -> None:
    just_below = allowance(top_up_entry_id=1, size_after_top_up=1_000, balance=501)
    at = allowance(top_up_entry_id=1, size_after_top_up=1_000, balance=500)
    assert crossed(just_below, [50, 80, 100]) == []
    assert crossed(at, [50, 80, 100]) == [50]


def test_odd_sizes_do_not_round_a_threshold_away() -> None:
    # 80% of 7 is 5.6: 5 used is not 80%, 6 used is.
    assert crossed(allowance(top_up_entry_id=1, size_after_top_up=7, balance=2), [80]) == []
    assert crossed(allowance(top_up_entry_id=1, size_after_top_up=7, balance=1), [80]) == [80]


def test_everything_gone_is_100_percent_and_blocking() -> None:
    a = allowance(top_up_entry_id=3, size_after_top_up=50, balance=0)
    assert a.percent_used == 100
    assert crossed(a, [50, 80, 100]) == [50, 80, 100]
    assert level(100) == "blocking"


def test_a_balance_above_the_top_up_counts_as_nothing_used() -> None:
    # e.g. a refund landed after the last top-up entry was written
    a = allowance(top_up_entry_id=3, size_after_top_up=50, balance=80)
    assert (a.used, a.percent_used) == (0, 0)


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [(50, "info"), (79, "info"), (80, "warning"), (99, "warning"), (100, "blocking")],
)
def test_levels(threshold: int, expected: str) -> None:
    assert level(threshold) == expected


def test_banner_text_says_how_much_is_left() -> None:
    a = allowance(top_up_entry_id=1, size_after_top_up=2_000, balance=300)
    assert banner_text(80, a) == "You have used 85% of your credits (300 of 2,000 left)."
    assert "Buy credits" in banner_text(100, a)


def test_the_share_used_is_within_the_allowance_and_rounded_down() -> None:
    assert share(size=7, used=5) == Share(used=5, left=2, percent=71)
    assert share(size=50, used=80) == Share(used=50, left=0, percent=100)
    assert share(size=50, used=-3) == Share(used=0, left=50, percent=0)
    assert share(size=0, used=0) == Share(used=0, left=0, percent=0)  # nothing of nothing


def test_a_user_who_never_had_credits_has_used_all_of_none() -> None:
    never = allowance(top_up_entry_id=None, size_after_top_up=0, balance=0)
    emptied = allowance(top_up_entry_id=4, size_after_top_up=0, balance=0)
    assert (never.percent_used, emptied.percent_used) == (100, 0)
