"""Credits arithmetic for model calls. Integers only; every fraction of a credit rounds up."""

from __future__ import annotations

from dataclasses import dataclass

from aicredits.domain.errors import InvalidAmount, InvalidRequest

TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """One version of a model's price: integer credits per 1M input and output tokens."""

    version_id: int
    model: str
    input_per_mtok: int
    output_per_mtok: int


def ceil_div(numerator: int, denominator: int) -> int:
    """Exact integer ceiling division for a non-negative numerator and a positive denominator."""
    if numerator < 0 or denominator <= 0:
        raise ValueError("ceil_div needs numerator >= 0 and denominator > 0")
    return -(-numerator // denominator)


def usage_cost(price: Price, *, input_tokens: int, output_tokens: int) -> int:
    """Credits for actual usage: ceil((in * in_price + out * out_price) / 1M)."""
    if input_tokens < 0 or output_tokens < 0:
        raise InvalidAmount("token counts cannot be negative")
    micro = input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok
    return ceil_div(micro, TOKENS_PER_PRICE_UNIT)


def clamp_max_tokens(requested: int | None, *, model_limit: int) -> int:
    """The output budget a call may use: the request's max_tokens, at most the model's limit.

    No request value means the model's limit. Zero, negative or non-integer values are refused.
    """
    if requested is None:
        return model_limit
    if isinstance(requested, bool) or not isinstance(requested, int):
        raise InvalidRequest("max_tokens must be a whole number")
    if requested < 1:
        raise InvalidRequest("max_tokens must be at least 1")
    return min(requested, model_limit)


def worst_case_cost(price: Price, *, prompt_tokens: int, max_output_tokens: int) -> int:
    """What a call can cost at most: the whole prompt plus every allowed output token."""
    return usage_cost(price, input_tokens=prompt_tokens, output_tokens=max_output_tokens)


def credits_per_1k(per_mtok: int) -> str:
    """A per-1M-token price shown per 1K tokens, without float rounding surprises."""
    whole, rest = divmod(per_mtok, 1000)
    if rest == 0:
        return str(whole)
    return f"{whole}.{rest:03d}".rstrip("0")
