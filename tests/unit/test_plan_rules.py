"""What a paid subscription invoice grants (domain.plans): a period's allowance until the
period's end, an upgrade's prorated difference, nothing for a downgrade or a past period."""

from __future__ import annotations

from datetime import UTC, datetime

from aicredits.domain.plans import PlanLine, invoice_grant, plan_is_usable

DAY = 86_400
T0 = 1_800_000_000
T1 = T0 + 30 * DAY
NOW = datetime.fromtimestamp(T0 + 60, UTC)


def at(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def test_a_period_invoice_grants_the_allowance_until_the_period_end() -> None:
    grant = invoice_grant(
        [PlanLine(25_000, 2_000, T0, T1, proration=False)], period_seconds=None, now=NOW
    )
    assert (grant.credits, grant.expires_at, grant.period_start) == (25_000, at(T1), at(T0))


def test_an_upgrade_grants_the_difference_for_the_part_of_the_period_left() -> None:
    middle = T0 + 20 * DAY
    lines = [
        PlanLine(25_000, -666, middle, T1, proration=True),
        PlanLine(70_000, 1_666, middle, T1, proration=True),
    ]
    grant = invoice_grant(lines, period_seconds=30 * DAY, now=at(middle))
    assert grant.credits == 45_000 // 3
    assert (grant.expires_at, grant.period_start) == (at(T1), None)


def test_a_downgrade_grants_nothing() -> None:
    lines = [
        PlanLine(70_000, -3_000, T0 + DAY, T1, proration=True),
        PlanLine(25_000, 1_200, T0 + DAY, T1, proration=True),
    ]
    assert invoice_grant(lines, period_seconds=30 * DAY, now=NOW).credits == 0


def test_a_period_already_over_grants_nothing() -> None:
    grant = invoice_grant(
        [PlanLine(25_000, 2_000, T0, T1, proration=False)], period_seconds=None, now=at(T1)
    )
    assert grant.credits == 0 and grant.expires_at is None


def test_a_cycle_invoice_carrying_last_periods_prorations_grants_the_new_period() -> None:
    lines = [
        PlanLine(70_000, 5_000, T1, T1 + 30 * DAY, proration=False),
        # An upgrade made late last period, invoiced now: its period is over.
        PlanLine(25_000, -100, T1 - DAY, T1, proration=True),
        PlanLine(70_000, 250, T1 - DAY, T1, proration=True),
    ]
    grant = invoice_grant(lines, period_seconds=30 * DAY, now=at(T1 + 60))
    assert grant.credits == 70_000 + 45_000 // 30
    assert grant.expires_at == at(T1 + 30 * DAY)


def test_whether_a_plan_is_usable_depends_on_its_status_and_policy() -> None:
    assert plan_is_usable("active", usable_when_past_due=False)
    assert plan_is_usable("past_due", usable_when_past_due=True)
    assert not plan_is_usable("past_due", usable_when_past_due=False)
    assert not plan_is_usable("canceled", usable_when_past_due=True)
