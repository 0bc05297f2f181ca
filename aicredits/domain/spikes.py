"""The spike rule: when a user's spending in the last hour is out of line with their usual.

A user spikes when they spent, in the last hour, at least `min_credits` (and at least one
credit) and more than `factor` times their average hourly spend over the 7 days before that
hour. Credits are integers and the factor an exact fraction, so the rule is decided in
integers: a spend exactly at the line is never pushed over it by rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

# The usual hourly spend is the 7 days before the last hour, divided by this.
BASELINE_HOURS = 7 * 24


@dataclass(frozen=True, slots=True)
class SpikeRule:
    factor: Fraction
    min_credits: int

    @classmethod
    def of(cls, *, factor: float | int | str | Fraction, min_credits: int) -> SpikeRule:
        """The rule for a configured factor. A float is read as the decimal it was written
        as (2.3 is 23/10, not the binary float nearest to it)."""
        exact = Fraction(str(factor)) if isinstance(factor, float) else Fraction(factor)
        if exact <= 0:
            raise ValueError("the spike factor must be positive")
        return cls(factor=exact, min_credits=min_credits)

    @property
    def least_last_hour(self) -> int:
        """The fewest credits spent in the last hour that can be a spike."""
        return max(self.min_credits, 1)

    def is_spike(self, *, last_hour: int, previous_week: int) -> bool:
        """Whether `last_hour` credits, after `previous_week` credits in the 7 days before
        that hour, is a spike."""
        if last_hour < self.least_last_hour:
            return False
        # last_hour > factor * previous_week / BASELINE_HOURS, multiplied out.
        return (
            last_hour * BASELINE_HOURS * self.factor.denominator
            > self.factor.numerator * previous_week
        )


def usual_hourly(previous_week: int) -> Fraction:
    """The average hourly spend over the 7 days before the last hour, exactly."""
    return Fraction(previous_week, BASELINE_HOURS)


def usual_hourly_text(previous_week: int) -> str:
    """The usual hourly spend to one decimal, as admins read it: "1.0", "1,234.5" (a tie
    rounds to even, as Python's own formatting does)."""
    tenths = round(usual_hourly(previous_week) * 10)
    return f"{tenths // 10:,}.{tenths % 10}"
