"""The current allowance and its warning thresholds. Pure arithmetic on integers.

An allowance starts at the last top-up: a grant, purchase, refund or positive adjustment.
Its size is the balance right after that entry (what was left before plus what was added);
what has been used since is the size minus the balance now. Expired credits count as used:
they are gone all the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from aicredits.domain.ledger import EntryKind

TOP_UP_KINDS = frozenset(
    {EntryKind.GRANT, EntryKind.PURCHASE, EntryKind.REFUND, EntryKind.ADJUSTMENT}
)
Level = Literal["info", "warning", "blocking"]


@dataclass(frozen=True, slots=True)
class Allowance:
    # The ledger entry that started it (None: the user never had any credits).
    entry_id: int | None
    size: int
    used: int

    @property
    def remaining(self) -> int:
        return share(size=self.size, used=self.used).left

    @property
    def percent_used(self) -> int:
        """Whole percent, rounded down (so 100 means every credit is gone). A user who never
        had credits has used all of none."""
        if self.size <= 0 and self.entry_id is None:
            return 100
        return share(size=self.size, used=self.used).percent


@dataclass(frozen=True, slots=True)
class Share:
    used: int
    left: int
    # Whole percent used, rounded down: 100 only when every credit is gone, 0 of nothing.
    percent: int


def share(*, size: int, used: int) -> Share:
    """How much of an allowance of `size` credits is used and left, and the percent used: the
    one derivation the banner, the dashboard and the warning emails show."""
    size = max(size, 0)
    used = min(max(used, 0), size)
    return Share(used=used, left=size - used, percent=used * 100 // size if size else 0)


def allowance(*, top_up_entry_id: int | None, size_after_top_up: int, balance: int) -> Allowance:
    if top_up_entry_id is None:
        return Allowance(entry_id=None, size=0, used=0)
    size = max(size_after_top_up, 0)
    return Allowance(entry_id=top_up_entry_id, size=size, used=min(size, max(0, size - balance)))


def crossed(current: Allowance, thresholds: Sequence[int]) -> list[int]:
    """The thresholds (percents) this allowance has reached, exactly: used/size >= t/100."""
    if current.entry_id is None or current.size <= 0:
        return []
    return [t for t in sorted(thresholds) if current.used * 100 >= t * current.size]


def level(threshold: int) -> Level:
    """How loud a threshold's banner is: 100% blocks chat; 80% and up warns; below informs."""
    if threshold >= 100:
        return "blocking"
    if threshold >= 80:
        return "warning"
    return "info"


def banner_text(threshold: int, current: Allowance) -> str:
    if threshold >= 100:
        return "You have used all your credits. Buy credits to keep chatting."
    return (
        f"You have used {current.percent_used}% of your credits "
        f"({current.remaining:,} of {current.size:,} left)."
    )
