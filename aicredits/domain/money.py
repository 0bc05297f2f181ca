"""Money, as Stripe counts it: integer amounts in a currency's smallest unit (500 = 5.00 USD).
Pure arithmetic on integers: how an amount is shown, what a refund takes back, what credits
are worth."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

# These currencies have no unit below the main one, or three decimals instead of two.
_ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd"}
    | {"vuv", "xaf", "xof", "xpf"}
)
_THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


class PricedPack(Protocol):
    """A credit pack as the valuation reads it (settings.CreditPack is one)."""

    @property
    def credits(self) -> int: ...

    @property
    def amount(self) -> int: ...

    @property
    def currency(self) -> str: ...


def format_money(amount: int, currency: str) -> str:
    """500, "usd" -> "5.00 USD" (Stripe amounts are in the currency's smallest unit)."""
    code = currency.upper()
    if currency.lower() in _ZERO_DECIMAL:
        return f"{amount:,} {code}"
    if currency.lower() in _THREE_DECIMAL:
        return f"{amount // 1000:,}.{amount % 1000:03d} {code}"
    return f"{amount // 100:,}.{amount % 100:02d} {code}"


def clawback_target(*, credits: int, amount: int, amount_refunded: int) -> int:
    """The credits that the refunded part of a payment bought, rounded up, never more than
    the pack. Computed on the cumulative refund, so partial refunds never drift."""
    if credits <= 0 or amount_refunded <= 0:
        return 0
    if amount <= 0 or amount_refunded >= amount:
        return credits
    return min(credits, -(-credits * amount_refunded // amount))


def refund_due(
    *, credits_granted: int, amount: int, amount_refunded: int, clawed_back: int, shortfall: int
) -> int:
    """The credits a purchase's refunds so far still call for: what the refunded part bought,
    less what was already taken back or recorded as not recoverable. Nothing before the pack
    is credited."""
    target = clawback_target(
        credits=credits_granted, amount=amount, amount_refunded=amount_refunded
    )
    return target - clawed_back - shortfall


def credits_worth(credits: int, packs: Iterable[PricedPack]) -> str:
    """What `credits` are worth at the first pack priced in money (with 5,000 credits for
    5.00 USD, 2,500 credits are "2.50 USD"); "" when no pack has a plain price."""
    pack = next((p for p in packs if p.amount > 0), None)
    if pack is None:
        return ""
    return format_money(credits * pack.amount // pack.credits, pack.currency)


def grouped(number: int) -> str:
    """Every count the app shows, one way: with thousands grouped ("1,234", "-5,000")."""
    return f"{number:,}"


def credits_text(credits: int) -> str:
    """ "1 credit", "1,234 credits"."""
    return f"{grouped(credits)} credit{'' if abs(credits) == 1 else 's'}"
