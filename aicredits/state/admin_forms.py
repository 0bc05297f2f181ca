"""What the admin console's forms send, read as the services want it, and what the page says
when a service refuses: about the page, so kept with its state."""

from __future__ import annotations

from datetime import UTC, datetime

from aicredits.domain.errors import (
    AICreditsError,
    IdempotencyConflict,
    InsufficientCredits,
    UnknownUser,
)
from aicredits.services.admin_actions import (
    MAX_ADMIN_CREDITS,
    MAX_GRANT_DAYS,
    AdminError,
    InvalidEffectiveDate,
)


def admin_error_message(exc: AICreditsError) -> str:
    """One sentence an admin can act on, for any error the admin services raise."""
    if isinstance(exc, InsufficientCredits):
        return (
            "Refused: a balance can never go below zero, nor below what running calls hold. "
            f"{exc.needed:,} credits to take, {exc.available:,} available."
        )
    if isinstance(exc, IdempotencyConflict):
        return "This form was already used for another action. Reload the page and try again."
    if isinstance(exc, UnknownUser):
        return "There is no such user."
    text = str(exc)
    return text[:1].upper() + text[1:] if text else "The action was refused."


def parse_credits(text: object, *, what: str = "the amount") -> int:
    """A whole number of credits as typed: "-40", "+1,000", "2 500". Never a float."""
    raw = str(text if text is not None else "").strip()
    cleaned = raw.replace(",", "").replace("_", "").replace(" ", "")
    if cleaned.startswith("+"):
        cleaned = cleaned[1:]
    body = cleaned[1:] if cleaned.startswith("-") else cleaned
    if not body.isdigit() or not body.isascii():
        raise AdminError(f"Enter {what} as a whole number of credits.")
    if len(body) > 13 or abs(int(cleaned)) > MAX_ADMIN_CREDITS:
        raise AdminError(f"{what[:1].upper() + what[1:]} is too large.")
    return int(cleaned)


def parse_optional_days(text: object) -> int | None:
    raw = str(text if text is not None else "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not raw.isascii() or not 1 <= int(raw) <= MAX_GRANT_DAYS:
        raise AdminError(f"Expiry must be a whole number of days from 1 to {MAX_GRANT_DAYS}.")
    return int(raw)


def parse_id(text: object, *, what: str = "user") -> int:
    raw = str(text if text is not None else "").strip()
    if not raw.isdigit() or not raw.isascii() or len(raw) > 18:
        raise AdminError(f"There is no such {what}.")
    return int(raw)


def parse_effective_from(text: object, *, now: datetime | None = None) -> datetime | None:
    """A date and time from the form (UTC, "YYYY-MM-DDTHH:MM"), or None for "now"."""
    raw = str(text if text is not None else "").strip()
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidEffectiveDate("Enter the date and time as YYYY-MM-DD HH:MM (UTC).") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
