"""The admin overview's lines about the free trial limit per address."""

from __future__ import annotations

from datetime import date

from aicredits.services.admin_views import LimitedAddress, trial_limit_rule
from aicredits.settings import Settings
from aicredits.state.admin_rows import limited_address_row


def test_a_limited_address_is_shown_with_its_day_and_counts() -> None:
    row = limited_address_row(
        LimitedAddress(address="2001:db8:1:2::/64", day=date(2026, 11, 30), granted=3, refused=1200)
    )
    assert row == {
        "id": "2001:db8:1:2::/64-2026-11-30",
        "address": "2001:db8:1:2::/64",
        "day": "2026-11-30",
        "granted": "3",
        "refused": "1,200",
    }


def test_the_rule_says_what_is_limited() -> None:
    def rule(**values: int) -> str:
        return trial_limit_rule(Settings(_env_file=None, **values))  # type: ignore[arg-type]

    assert rule(trials_per_address_per_day=3).startswith("At most 3 new accounts a day")
    assert "not limited" in rule(trials_per_address_per_day=0)
    assert "No free trial is given" in rule(free_trial_credits=0)
