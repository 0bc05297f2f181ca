"""Typed errors raised by the domain and services, mapped to one status and message at the edge."""

from __future__ import annotations


class AICreditsError(Exception):
    """Base of every error the app raises on purpose. `code` is stable and machine-readable."""

    code = "error"


class InvalidRequest(AICreditsError):
    code = "invalid_request"


class InvalidAmount(InvalidRequest):
    code = "invalid_amount"


class MissingReason(InvalidRequest):
    code = "missing_reason"


class UnknownUser(AICreditsError):
    code = "unknown_user"


class UnknownHold(AICreditsError):
    code = "unknown_hold"


class UnknownModel(InvalidRequest):
    code = "unknown_model"


class InsufficientCredits(AICreditsError):
    """The available credits (balance minus held) do not cover what is needed."""

    code = "insufficient_credits"

    def __init__(self, *, available: int, needed: int) -> None:
        self.available = available
        self.needed = needed
        super().__init__(f"insufficient credits: {needed} needed, {available} available")


class IdempotencyConflict(AICreditsError):
    """An idempotency key was replayed with different parameters from its first use."""

    code = "idempotency_conflict"


class InvalidParameter(InvalidRequest):
    """One field of a request has a wrong type or value; `param` names it, as OpenAI's
    errors do."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedParameter(InvalidParameter):
    """A field this service does not offer, so it is refused rather than silently dropped."""

    code = "unsupported_parameter"


class InvalidIdempotencyKey(InvalidRequest):
    code = "invalid_idempotency_key"
