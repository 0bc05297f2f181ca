"""Plans on the ledger: how many credits a paid subscription invoice grants, and until when.

Pure: the caller passes each invoice line already matched to its plan's included credits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

# Statuses in which a subscription's plan is the user's plan.
LIVE_STATUSES = frozenset({"active", "trialing", "past_due"})


@dataclass(frozen=True, slots=True)
class PlanLine:
    """One invoice line, with the included credits of the plan its price belongs to."""

    included_credits: int
    amount: int  # signed: a proration's credit for unused time is negative
    period_start: int
    period_end: int
    proration: bool


@dataclass(frozen=True, slots=True)
class InvoiceGrant:
    credits: int
    expires_at: datetime | None
    # The start of the period the invoice opens (None for a proration-only invoice).
    period_start: datetime | None


def _at(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def invoice_grant(
    lines: Sequence[PlanLine], *, period_seconds: int | None, now: datetime
) -> InvoiceGrant:
    """What a paid invoice grants.

    * A period line (not a proration): the plan's included credits, until the line's end.
    * An upgrade's proration pair (a negative line for the old plan's unused time, a positive
      one for the new plan's): the difference of the two allowances, scaled to the part of
      the period left (the same share Stripe charges), until the period's end. A downgrade
      grants nothing: what was granted for the period stays until it ends.
    Nothing is granted for a period already over."""
    credits = 0
    expires: int | None = None
    opens: int | None = None
    regular = [line for line in lines if not line.proration]
    for line in regular:
        credits += line.included_credits
        expires = max(expires or 0, line.period_end)
        opens = line.period_start if opens is None else min(opens, line.period_start)
    added = [line for line in lines if line.proration and line.amount > 0]
    removed = [line for line in lines if line.proration and line.amount < 0]
    if added:
        gained = sum(line.included_credits for line in added) - sum(
            line.included_credits for line in removed
        )
        start = min(line.period_start for line in added)
        end = max(line.period_end for line in added)
        if gained > 0 and end > start:
            share = (end - start) / period_seconds if period_seconds else 1.0
            credits += int(gained * min(share, 1.0))
            expires = max(expires or 0, end)
    if expires is None or _at(expires) <= now or credits <= 0:
        return InvoiceGrant(0, None, _at(opens) if opens is not None else None)
    return InvoiceGrant(credits, _at(expires), _at(opens) if opens is not None else None)


def plan_is_usable(status: str, *, usable_when_past_due: bool) -> bool:
    """Whether calls may spend a plan's credits while its subscription has this status."""
    if status == "past_due":
        return usable_when_past_due
    return status in LIVE_STATUSES
