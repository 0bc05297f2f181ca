"""Reading the admin console's forms: whole credits as typed, days, ids and dates; never a
float."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aicredits.services.admin_actions import ActionKind, AdminError, InvalidEffectiveDate
from aicredits.state import admin_forms


def test_form_input_parsing_is_exact() -> None:
    assert admin_forms.parse_credits("-40") == -40
    assert admin_forms.parse_credits("+1,000") == 1000
    assert admin_forms.parse_credits(" 2 500 ") == 2500
    for bad in ("", "1.5", "1e3", "abc", "--1", "٣", "9" * 14):
        with pytest.raises(AdminError):
            admin_forms.parse_credits(bad)
    assert admin_forms.parse_optional_days("") is None
    assert admin_forms.parse_optional_days("30") == 30
    for bad in ("0", "-1", "x", "99999"):
        with pytest.raises(AdminError):
            admin_forms.parse_optional_days(bad)
    assert admin_forms.parse_effective_from("") is None
    assert admin_forms.parse_effective_from("2030-01-02T03:04") == datetime(
        2030, 1, 2, 3, 4, tzinfo=UTC
    )
    with pytest.raises(InvalidEffectiveDate):
        admin_forms.parse_effective_from("tomorrow")
    assert ActionKind.ADJUST_BALANCE == "adjust_balance"
