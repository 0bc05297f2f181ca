"""domain.auto_topup: the threshold the form suggests."""

from __future__ import annotations

import pytest

from aicredits.domain.auto_topup import check_settings, suggested_threshold


@pytest.mark.parametrize(("pack", "threshold"), [(5_000, 1_000), (22_000, 4_400), (3, 1)])
def test_the_suggestion_is_a_fifth_of_the_pack_and_always_a_valid_threshold(
    pack: int, threshold: int
) -> None:
    assert suggested_threshold(pack) == threshold
    check_settings(threshold=suggested_threshold(pack), monthly_cap=1)  # raises if not valid
