"""The credits dashboard: the balance and what it is worth, the current allowance, usage
over time and by model, the ledger history, and a CSV export. Read-only.

`credits_page` reads everything the credits page shows in one snapshot; the other readers
take the Database (a read of their own) or the caller's connection."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database, reading
from aicredits.adapters.tables import ledger_entries, purchases, usage_events, utcnow
from aicredits.domain.allowance import Allowance, share
from aicredits.domain.ledger import EntryKind
from aicredits.domain.money import credits_worth
from aicredits.services import ledger, thresholds, trials
from aicredits.services.packs import PackOffer, list_packs
from aicredits.services.purchases import PurchaseView, list_purchases
from aicredits.settings import Settings

USAGE_DAYS = 30
PAGE_SIZE = 20


@dataclass(frozen=True, slots=True)
class Summary:
    available: int
    held: int
    total: int
    # "5.00 USD", at the first pack's rate; "" when no pack has a plain price.
    available_money: str
    total_money: str
    expiring: list[tuple[datetime, int]]
    allowance: Allowance
    # Whole percent of the allowance used: 0 for a user who never had credits.
    allowance_percent: int
    allowance_since: datetime | None


@dataclass(frozen=True, slots=True)
class ModelUsage:
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    credits: int


@dataclass(frozen=True, slots=True)
class DayUsage:
    day: date
    credits_by_model: dict[str, int]


@dataclass(frozen=True, slots=True)
class HistoryLine:
    id: int
    created_at: datetime
    kind: str
    amount: int
    balance_after: int
    reason: str
    reference: str | None
    receipt_url: str | None


def summary(target: Database | Connection, settings: Settings, *, user_id: int) -> Summary:
    with reading(target, snapshot=True) as conn:
        balance = ledger.get_balance(conn, user_id=user_id)
        current = thresholds.current_allowance(conn, user_id=user_id)
        since = None
        if current.entry_id is not None:
            since = conn.execute(
                sa.select(ledger_entries.c.created_at).where(
                    ledger_entries.c.id == current.entry_id
                )
            ).scalar_one_or_none()
        expiring = ledger.expiring_credits(conn, user_id=user_id)
    return Summary(
        available=balance.available,
        held=balance.held,
        total=balance.balance,
        available_money=credits_worth(balance.available, settings.packs),
        total_money=credits_worth(balance.balance, settings.packs),
        expiring=expiring,
        allowance=current,
        allowance_percent=share(size=current.size, used=current.used).percent,
        allowance_since=since,
    )


def usage_by_model(
    target: Database | Connection,
    *,
    user_id: int,
    days: int = USAGE_DAYS,
    now: datetime | None = None,
) -> list[ModelUsage]:
    since = (now or utcnow()) - timedelta(days=days)
    e = usage_events
    with reading(target) as conn:
        rows = conn.execute(
            sa.select(
                e.c.model,
                sa.func.count().label("calls"),
                sa.func.coalesce(sa.func.sum(e.c.input_tokens), 0).label("input_tokens"),
                sa.func.coalesce(sa.func.sum(e.c.output_tokens), 0).label("output_tokens"),
                sa.func.coalesce(sa.func.sum(e.c.charged), 0).label("credits"),
            )
            .where(e.c.user_id == user_id, e.c.created_at >= since)
            .group_by(e.c.model)
            .order_by(sa.desc("credits"), e.c.model)
        ).all()
    return [
        ModelUsage(r.model, int(r.calls), int(r.input_tokens), int(r.output_tokens), int(r.credits))
        for r in rows
    ]


def daily_usage(
    target: Database | Connection,
    *,
    user_id: int,
    days: int = USAGE_DAYS,
    now: datetime | None = None,
) -> list[DayUsage]:
    """Credits charged per UTC day and model, for each of the last `days` days (zeros
    included, so a chart has no gaps)."""
    now = now or utcnow()
    first_day = (now - timedelta(days=days - 1)).date()
    start = datetime.combine(first_day, datetime.min.time(), tzinfo=now.tzinfo)
    with reading(target) as conn:
        rows = conn.execute(
            sa.select(
                usage_events.c.created_at, usage_events.c.model, usage_events.c.charged
            ).where(usage_events.c.user_id == user_id, usage_events.c.created_at >= start)
        ).all()
    per_day: dict[date, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        per_day[row.created_at.date()][row.model] += int(row.charged)
    return [
        DayUsage(
            day=first_day + timedelta(days=i),
            credits_by_model=dict(per_day[first_day + timedelta(days=i)]),
        )
        for i in range(days)
    ]


def history(
    target: Database | Connection,
    *,
    user_id: int,
    kind: str | None = None,
    page: int = 1,
    per_page: int = PAGE_SIZE,
) -> tuple[list[HistoryLine], int]:
    """One page of the ledger, newest first, and the number of pages. `kind` filters."""
    if kind is not None and kind not in {k.value for k in EntryKind}:
        kind = None
    where = [ledger_entries.c.user_id == user_id]
    if kind:
        where.append(ledger_entries.c.kind == kind)
    with reading(target, snapshot=True) as conn:
        total = int(
            conn.execute(
                sa.select(sa.func.count()).select_from(ledger_entries).where(*where)
            ).scalar_one()
        )
        pages = max(1, -(-total // per_page))
        page = min(max(page, 1), pages)
        rows = conn.execute(
            sa.select(ledger_entries, purchases.c.receipt_url)
            .select_from(
                ledger_entries.outerjoin(
                    purchases,
                    ledger_entries.c.reference
                    == sa.literal("stripe:") + purchases.c.checkout_session_id,
                )
            )
            .where(*where)
            .order_by(ledger_entries.c.id.desc())
            .offset((page - 1) * per_page)
            .limit(per_page)
        ).all()
    return [
        HistoryLine(
            id=r.id,
            created_at=r.created_at,
            kind=r.kind,
            amount=r.amount,
            balance_after=r.balance_after,
            reason=r.reason,
            reference=r.reference,
            receipt_url=r.receipt_url,
        )
        for r in rows
    ], pages


@dataclass(frozen=True, slots=True)
class CreditsPage:
    """Everything the credits page shows, as of one moment."""

    available: int  # the header's credits
    usage: thresholds.UsageStatus
    trial_notice: str  # "" when there is nothing to say
    packs: list[PackOffer]
    purchases: list[PurchaseView]
    summary: Summary
    daily_usage: list[DayUsage]
    usage_by_model: list[ModelUsage]
    history: list[HistoryLine]
    history_pages: int


def credits_page(
    db: Database,
    settings: Settings,
    *,
    user_id: int,
    history_kind: str | None = None,
    history_page: int = 1,
    now: datetime | None = None,
) -> CreditsPage:
    """The credits page, read in one snapshot: the balance, the banner, the dashboard and the
    histories all agree with each other, whatever is charged meanwhile."""
    with db.read(snapshot=True) as conn:
        totals = summary(conn, settings, user_id=user_id)
        lines, pages = history(conn, user_id=user_id, kind=history_kind, page=history_page)
        return CreditsPage(
            available=totals.available,
            usage=thresholds.status(conn, settings, user_id=user_id),
            trial_notice=trials.trial_notice(conn, user_id=user_id, now=now) or "",
            packs=list_packs(settings),
            purchases=list_purchases(conn, user_id=user_id),
            summary=totals,
            daily_usage=daily_usage(conn, user_id=user_id, now=now),
            usage_by_model=usage_by_model(conn, user_id=user_id, now=now),
            history=lines,
            history_pages=pages,
        )


EXPORT_COLUMNS = [
    "record",
    "id",
    "created_at",
    "kind_or_model",
    "credits",
    "balance_after",
    "input_tokens",
    "output_tokens",
    "estimated",
    "request_or_reference",
    "reason_or_outcome",
]


def export_csv(db: Database, *, user_id: int) -> Iterator[str]:
    """The user's own ledger entries and usage events, as CSV text (streamed in pieces)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def flush() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    writer.writerow(EXPORT_COLUMNS)
    yield flush()
    with db.read(snapshot=True) as conn:
        for r in conn.execute(
            sa.select(ledger_entries)
            .where(ledger_entries.c.user_id == user_id)
            .order_by(ledger_entries.c.id)
        ):
            writer.writerow(
                ["ledger", r.id, r.created_at.isoformat(), r.kind, r.amount, r.balance_after,
                 "", "", "", r.reference or "", r.reason]
            )  # fmt: skip
        yield flush()
        for u in conn.execute(
            sa.select(usage_events)
            .where(usage_events.c.user_id == user_id)
            .order_by(usage_events.c.id)
        ):
            writer.writerow(
                ["usage", u.id, u.created_at.isoformat(), u.model, -u.charged, "",
                 u.input_tokens, u.output_tokens, str(u.estimated).lower(), u.request_id,
                 u.outcome]
            )  # fmt: skip
        yield flush()
