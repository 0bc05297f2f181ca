"""Which bucket a sign-up's address counts in, and what a user refused the trial reads."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from aicredits.domain.trials import (
    UNKNOWN_ADDRESS,
    address_bucket,
    trial_day,
    withheld_trial_notice,
)


@pytest.mark.parametrize(
    ("address", "bucket"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        (None, UNKNOWN_ADDRESS),
        ("", UNKNOWN_ADDRESS),
        ("testclient", UNKNOWN_ADDRESS),
        ("unknown", UNKNOWN_ADDRESS),
    ],
)
def test_an_address_counts_in_its_bucket(address: str | None, bucket: str) -> None:
    assert address_bucket(address) == bucket


def test_one_ipv6_household_cannot_spread_over_its_64() -> None:
    assert address_bucket("2001:db8:0:1::1") == address_bucket("2001:db8:0:1:ffff::9")
    assert address_bucket("2001:db8:0:1::1") != address_bucket("2001:db8:0:2::1")


def test_the_day_is_the_utc_day() -> None:
    evening_in_new_york = datetime(2026, 11, 30, 20, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert trial_day(evening_in_new_york) == date(2026, 12, 1)
    assert trial_day(datetime(2026, 11, 30, 23, 59, tzinfo=UTC)) == date(2026, 11, 30)


def test_the_notice_says_why_today_and_what_to_do() -> None:
    now = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    text = withheld_trial_notice(others=3, withheld_at=now - timedelta(hours=2), now=now)
    assert text == (
        "No free trial for this account: 3 accounts already got one from your network "
        "today. Buy credits to start."
    )


def test_the_notice_names_the_day_once_it_is_past() -> None:
    now = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    withheld = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    text = withheld_trial_notice(others=1, withheld_at=withheld, now=now)
    assert "1 account had already got one from your network on 2026-11-30 (UTC)" in text
    assert text.endswith("Buy credits to start.")
