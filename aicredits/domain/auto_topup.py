"""Auto top-up rules: when one is due, what the user may set, what a failure does.

Pure: no I/O. The service reads the rows and applies these.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from aicredits.domain.errors import AICreditsError

MAX_THRESHOLD = 10_000_000_000
MAX_MONTHLY_CAP = 100
# Until a user sets a threshold, the form suggests this share of the pack it would buy.
SUGGESTED_THRESHOLD_SHARE = 5  # a fifth


def suggested_threshold(pack_credits: int) -> int:
    """The threshold the form starts with: a fifth of the pack, so the top-up lands while
    some credits are left for the calls under way."""
    return max(1, pack_credits // SUGGESTED_THRESHOLD_SHARE)


class InvalidAutoTopUp(AICreditsError):
    """Settings the user cannot have (no card, an unknown pack, a threshold out of range).
    `message` is safe to show."""

    code = "invalid_auto_topup"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Notice(StrEnum):
    """What the banner about auto top-up says, if anything."""

    NONE = ""
    FAILED = "failed"
    ACTION_REQUIRED = "action_required"
    DISABLED = "disabled"
    CAP_REACHED = "cap_reached"


# Ours: a top-up left in flight on a simulated card when a Stripe key was set (nothing charged).
SIMULATED_CARD = "simulated_card"
SIMULATED_CARD_NOTICE = (
    "Auto top-up is off: the saved card was a simulated one, and payments now go through "
    "Stripe. Save a card to turn it on again."
)

# Stripe's decline codes we explain in words; any other is "declined".
_REASONS = {
    "authentication_required": "your bank asks you to confirm the payment",
    "expired_card": "the card has expired",
    "insufficient_funds": "the card has insufficient funds",
    "card_declined": "the card was declined",
    "generic_decline": "the card was declined",
    "incorrect_cvc": "the card was declined (security code)",
    "lost_card": "the card was declined",
    "stolen_card": "the card was declined",
    SIMULATED_CARD: "the saved card was a simulated one, and payments now go through Stripe",
}


def failure_reason(code: str) -> str:
    return _REASONS.get(code, "the card was declined")


@dataclass(frozen=True, slots=True)
class Due:
    """Whether a top-up should start now, and if not, why not."""

    due: bool
    why_not: str = ""


def is_due(
    *,
    enabled: bool,
    has_card: bool,
    available: int,
    threshold: int,
    retry_after: datetime | None,
    now: datetime,
) -> Due:
    if not enabled:
        return Due(False, "off")
    if not has_card:
        return Due(False, "no card")
    if available >= threshold:
        return Due(False, "above the threshold")
    if retry_after is not None and now < retry_after:
        return Due(False, "waiting after a failure")
    return Due(True)


def month_start(now: datetime) -> datetime:
    """The first moment of `now`'s calendar month, UTC: the monthly cap counts from here."""
    utc = now.astimezone(UTC)
    return datetime(utc.year, utc.month, 1, tzinfo=UTC)


def cap_reached(*, this_month: int, monthly_cap: int) -> bool:
    return this_month >= monthly_cap


def turns_off(*, failures_in_a_row: int, max_failures: int) -> bool:
    """After this many failures in a row auto top-up turns itself off."""
    return failures_in_a_row >= max_failures


def check_settings(*, threshold: int, monthly_cap: int) -> None:
    if threshold < 1 or threshold > MAX_THRESHOLD:
        raise InvalidAutoTopUp(f"The threshold must be between 1 and {MAX_THRESHOLD:,} credits.")
    if monthly_cap < 1 or monthly_cap > MAX_MONTHLY_CAP:
        raise InvalidAutoTopUp(
            f"The monthly limit must be between 1 and {MAX_MONTHLY_CAP} top-ups."
        )


def failure_notice(*, code: str, failures_in_a_row: int, disabled: bool, pack: str) -> str:
    reason = failure_reason(code)
    if disabled:
        return (
            f"Auto top-up is now off: {failures_in_a_row} top-ups in a row failed (the last "
            f"because {reason}). Check your card and turn it on again."
        )
    if code == "authentication_required":
        return (
            f"Your automatic top-up of the {pack} pack was not paid: {reason}. Buy the pack "
            "once on Stripe's page to confirm it; auto top-up tries again later."
        )
    return (
        f"Your automatic top-up of the {pack} pack failed: {reason}. It tries again later; "
        "you can change the card or buy a pack yourself."
    )


def cap_notice(monthly_cap: int) -> str:
    return (
        f"Auto top-up has reached this month's limit of {monthly_cap} top-ups, so it did not "
        "buy more. Raise the limit or buy a pack yourself."
    )
