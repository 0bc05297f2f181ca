"""Pure ledger rules: entry kinds and signs, settlement split, expiring-lot consumption, invariants.

The service layer does the SQL; everything here is arithmetic on plain values so it can be
tested without a database.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from aicredits.domain.errors import InvalidAmount, MissingReason


class EntryKind(StrEnum):
    GRANT = "grant"
    PURCHASE = "purchase"
    SPEND = "spend"
    REFUND = "refund"
    ADJUSTMENT = "adjustment"
    CLAWBACK = "clawback"
    EXPIRY = "expiry"


CREDIT_KINDS = frozenset({EntryKind.GRANT, EntryKind.PURCHASE, EntryKind.REFUND})
DEBIT_KINDS = frozenset({EntryKind.SPEND, EntryKind.CLAWBACK, EntryKind.EXPIRY})


class HoldStatus(StrEnum):
    PENDING = "pending"
    SETTLED = "settled"
    RELEASED = "released"
    EXPIRED = "expired"


MAX_KEY_LENGTH = 200
MAX_REASON_LENGTH = 500


def require_positive(credits: int, what: str = "credits") -> int:
    if isinstance(credits, bool) or not isinstance(credits, int):
        raise InvalidAmount(f"{what} must be a whole number")
    if credits <= 0:
        raise InvalidAmount(f"{what} must be greater than zero, got {credits}")
    return credits


def require_nonzero(credits: int) -> int:
    if isinstance(credits, bool) or not isinstance(credits, int):
        raise InvalidAmount("credits must be a whole number")
    if credits == 0:
        raise InvalidAmount("an adjustment of zero credits changes nothing")
    return credits


def require_non_negative(credits: int, what: str = "credits") -> int:
    if isinstance(credits, bool) or not isinstance(credits, int):
        raise InvalidAmount(f"{what} must be a whole number")
    if credits < 0:
        raise InvalidAmount(f"{what} cannot be negative, got {credits}")
    return credits


def require_reason(reason: str | None) -> str:
    text = (reason or "").strip()
    if not text:
        raise MissingReason("a reason is required")
    if len(text) > MAX_REASON_LENGTH:
        raise MissingReason(f"the reason is longer than {MAX_REASON_LENGTH} characters")
    return text


def require_key(key: str | None, what: str = "idempotency key") -> str:
    text = (key or "").strip()
    if not text:
        raise InvalidAmount(f"an {what} is required")
    if len(text) > MAX_KEY_LENGTH:
        raise InvalidAmount(f"the {what} is longer than {MAX_KEY_LENGTH} characters")
    return text


def sign_matches_kind(kind: EntryKind, amount: int) -> bool:
    if amount == 0:
        return False
    if kind in CREDIT_KINDS:
        return amount > 0
    if kind in DEBIT_KINDS:
        return amount < 0
    return True  # adjustments go either way


@dataclass(frozen=True, slots=True)
class Settlement:
    """How a settled hold splits: what is charged, and what is recorded but never taken."""

    charged: int
    unbilled: int


def split_settlement(*, hold_amount: int, actual: int) -> Settlement:
    """Charge min(actual, hold). Anything above the hold is unbilled overage, never debt."""
    require_non_negative(hold_amount, "hold amount")
    require_non_negative(actual, "actual credits")
    charged = min(actual, hold_amount)
    return Settlement(charged=charged, unbilled=actual - charged)


@dataclass(frozen=True, slots=True)
class LotGrant:
    """An expiring grant: the ledger entry that created it, its size and its date."""

    id: int
    entry_id: int
    amount: int
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class LedgerLine:
    """The part of a ledger entry that decides which credits it used."""

    id: int
    kind: str
    amount: int
    reference: str | None


def lot_reference(lot_id: int) -> str:
    return f"lot:{lot_id}"


def lot_remaining(lots: Sequence[LotGrant], lines: Iterable[LedgerLine]) -> dict[int, int]:
    """Replay a user's ledger (in id order) to find what is left of each expiring grant.

    Spending takes the soonest-expiring open grant first; an expiry entry takes from the lot
    it names. Non-expiring credits are whatever the balance holds beyond the lots. Deriving
    this from the append-only ledger keeps the hot path (settle) from touching lot rows.
    """
    by_entry = {lot.entry_id: lot for lot in lots}
    remaining: dict[int, int] = {}
    open_lots: list[LotGrant] = []
    for line in lines:
        lot = by_entry.get(line.id)
        if lot is not None:
            remaining[lot.id] = lot.amount
            open_lots.append(lot)
            open_lots.sort(key=lambda x: (x.expires_at, x.id))
            continue
        if line.amount >= 0:
            continue
        debit = -line.amount
        if line.kind == EntryKind.EXPIRY and line.reference:
            target = next((x for x in open_lots if lot_reference(x.id) == line.reference), None)
            candidates = [target] if target else []
        else:
            candidates = open_lots
        for candidate in candidates:
            if debit == 0:
                break
            take = min(remaining[candidate.id], debit)
            remaining[candidate.id] -= take
            debit -= take
    return remaining


def expiry_take(*, lot_remaining: int, available: int) -> int:
    """How much of a due lot leaves now.

    Credits reserved for an in-flight call stay until that call settles (spending takes the
    soonest-expiring credits first) or is released (the next expiry run takes them).
    """
    return max(0, min(lot_remaining, available))


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    """Everything verify-ledger needs to know about one account, read in one transaction."""

    user_id: int
    balance: int
    held: int
    ledger_sum: int
    last_balance_after: int | None
    pending_holds_sum: int
    expiring_sum: int


def account_violations(snapshot: AccountSnapshot) -> list[str]:
    """The invariants of DESIGN.md, "The ledger", for one account. Empty means healthy."""
    s = snapshot
    who = f"account of user {s.user_id}"
    problems: list[str] = []
    if s.balance < 0:
        problems.append(f"{who}: balance {s.balance} is negative")
    if s.held < 0:
        problems.append(f"{who}: held {s.held} is negative")
    if s.held > s.balance:
        problems.append(f"{who}: held {s.held} exceeds balance {s.balance}")
    if s.balance != s.ledger_sum:
        problems.append(f"{who}: balance {s.balance} != sum of ledger amounts {s.ledger_sum}")
    if s.last_balance_after is not None and s.last_balance_after != s.balance:
        problems.append(
            f"{who}: last entry's balance_after {s.last_balance_after} != balance {s.balance}"
        )
    if s.held != s.pending_holds_sum:
        problems.append(f"{who}: held {s.held} != sum of pending holds {s.pending_holds_sum}")
    if s.expiring_sum > s.balance:
        problems.append(f"{who}: expiring credits {s.expiring_sum} exceed balance {s.balance}")
    return problems


@dataclass(frozen=True, slots=True)
class EntryView:
    id: int
    kind: str
    amount: int
    balance_after: int


def chain_violations(user_id: int, entries: Iterable[EntryView]) -> list[str]:
    """Each entry's balance_after must equal the running sum, and each sign must fit its kind."""
    problems: list[str] = []
    running = 0
    for entry in entries:
        running += entry.amount
        where = f"ledger entry {entry.id} (user {user_id})"
        try:
            kind = EntryKind(entry.kind)
        except ValueError:
            problems.append(f"{where}: unknown kind {entry.kind!r}")
            continue
        if not sign_matches_kind(kind, entry.amount):
            problems.append(f"{where}: amount {entry.amount} does not fit kind {kind.value}")
        if entry.balance_after != running:
            problems.append(f"{where}: balance_after {entry.balance_after} != running {running}")
        if entry.balance_after < 0:
            problems.append(f"{where}: balance_after {entry.balance_after} is negative")
    return problems
