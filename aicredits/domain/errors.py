"""Typed errors raised by the domain and services, mapped to one status and message at the edge."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, TypeVar

# Which limit refused a call: requests per user, per client address, or calls in flight.
LimitScope = Literal["user", "ip", "concurrent"]

E = TypeVar("E", bound=BaseException)
T = TypeVar("T")


def answer_for(table: Mapping[type[E], T], error: E) -> T:
    """What an edge answers for `error`: the entry of its most specific class that `table`
    names. Each edge (HTTP routes, a page's state) keeps one such table; naming the base
    class there gives the default. KeyError when no class of `error` is named."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    raise KeyError(type(error).__name__)


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


class RateLimited(AICreditsError):
    """A limit refused the call. `retry_after` is in seconds, always > 0."""

    code = "rate_limited"

    def __init__(self, *, scope: LimitScope, retry_after: float) -> None:
        self.scope: LimitScope = scope
        self.retry_after = max(retry_after, 0.001)
        if scope == "concurrent":
            message = "Too many calls at once: wait for one to finish."
        elif scope == "ip":
            message = (
                f"Too many requests from your network: try again in {self.retry_after_header} s."
            )
        else:
            message = f"Too many requests: try again in {self.retry_after_header} s."
        super().__init__(message)

    @property
    def retry_after_header(self) -> str:
        """Whole seconds for an HTTP Retry-After header: rounded up, at least 1."""
        # Rounded to the millisecond first so float noise (12.0000001) does not add a second.
        return str(max(1, math.ceil(round(self.retry_after, 3))))


class LimiterUnavailable(AICreditsError):
    """The shared rate limiter (Redis) could not be reached and it is set to fail closed."""

    code = "rate_limiter_unavailable"


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
