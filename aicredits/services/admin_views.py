"""The admin console's views: find users, look into one account, read the audit log, and
watch the money (the overview, its spike alerts and the sign-ups past the free trial limit).
Each view reads from one snapshot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database
from aicredits.adapters.tables import (
    account_flags,
    admin_actions,
    credit_accounts,
    holds,
    ledger_entries,
    trial_addresses,
    usage_events,
    users,
    utcnow,
)
from aicredits.domain import spikes
from aicredits.domain.errors import UnknownUser
from aicredits.domain.ledger import EntryKind
from aicredits.services import ledger
from aicredits.services.purchases import PurchaseView, list_purchases
from aicredits.settings import Settings

PER_PAGE = 25
# The overview lists at most this many (address, day) rows that reached the trial limit.
MAX_LIMITED_ADDRESSES = 200


# --- users ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserSummary:
    id: int
    email: str | None
    name: str
    is_suspended: bool
    balance: int
    held: int
    total_purchased: int
    open_flags: tuple[str, ...]
    created_at: datetime
    last_activity: datetime | None

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass(frozen=True, slots=True)
class UserPage:
    users: list[UserSummary]
    total: int
    page: int
    pages: int
    query: str


def _pages(total: int, per_page: int) -> int:
    return max(1, -(-total // per_page))


def _user_filter(query: str) -> Any:
    q = query.strip()
    if not q:
        return sa.true()
    matches = [
        users.c.email.icontains(q, autoescape=True),
        users.c.name.icontains(q, autoescape=True),
    ]
    if q.isdigit() and q.isascii() and len(q) <= 18:
        matches.append(users.c.id == int(q))
    return sa.or_(*matches)


def _summaries(conn: Connection, rows: Sequence[Any]) -> list[UserSummary]:
    ids = [r.id for r in rows]
    if not ids:
        return []
    purchased = dict(
        conn.execute(
            sa.select(ledger_entries.c.user_id, sa.func.sum(ledger_entries.c.amount))
            .where(
                ledger_entries.c.user_id.in_(ids),
                ledger_entries.c.kind == EntryKind.PURCHASE.value,
            )
            .group_by(ledger_entries.c.user_id)
        ).all()
    )
    last_usage = dict(
        conn.execute(
            sa.select(usage_events.c.user_id, sa.func.max(usage_events.c.created_at))
            .where(usage_events.c.user_id.in_(ids))
            .group_by(usage_events.c.user_id)
        ).all()
    )
    flags: dict[int, list[str]] = {}
    for user_id, kind in conn.execute(
        sa.select(account_flags.c.user_id, account_flags.c.kind)
        .where(account_flags.c.user_id.in_(ids), account_flags.c.cleared_at.is_(None))
        .order_by(account_flags.c.id)
    ):
        if kind not in flags.setdefault(user_id, []):
            flags[user_id].append(kind)
    result = []
    for r in rows:
        # SQLite's func.max() on a TypeDecorator column comes back as text.
        usage_at = _as_utc(last_usage.get(r.id))
        seen = [m for m in (r.last_seen_at, usage_at) if m is not None]
        result.append(
            UserSummary(
                id=r.id,
                email=r.email,
                name=r.name,
                is_suspended=bool(r.is_suspended),
                balance=int(r.balance or 0),
                held=int(r.held or 0),
                total_purchased=int(purchased.get(r.id) or 0),
                open_flags=tuple(flags.get(r.id, [])),
                created_at=r.created_at,
                last_activity=max(seen) if seen else None,
            )
        )
    return result


def _as_utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _user_rows() -> sa.Select[Any]:
    return sa.select(
        users.c.id,
        users.c.email,
        users.c.name,
        users.c.is_suspended,
        users.c.created_at,
        users.c.last_seen_at,
        credit_accounts.c.balance,
        credit_accounts.c.held,
    ).select_from(users.outerjoin(credit_accounts, credit_accounts.c.user_id == users.c.id))


def search_users(
    db: Database, *, query: str = "", page: int = 1, per_page: int = PER_PAGE
) -> UserPage:
    """Users whose email or name contains `query` (or whose id it is), newest first."""
    query = query.strip()[:320]
    where = _user_filter(query)
    with db.read(snapshot=True) as conn:
        total = int(
            conn.execute(sa.select(sa.func.count()).select_from(users).where(where)).scalar_one()
        )
        pages = _pages(total, per_page)
        page = min(max(1, page), pages)
        rows = conn.execute(
            _user_rows()
            .where(where)
            .order_by(users.c.id.desc())
            .offset((page - 1) * per_page)
            .limit(per_page)
        ).all()
        found = _summaries(conn, rows)
    return UserPage(users=found, total=total, page=page, pages=pages, query=query)


@dataclass(frozen=True, slots=True)
class LedgerLineView:
    id: int
    created_at: datetime
    kind: str
    amount: int
    balance_after: int  # the running balance
    actor: str
    reason: str
    reference: str | None


@dataclass(frozen=True, slots=True)
class HoldRow:
    id: int
    request_id: str
    amount: int
    status: str
    charged: int | None
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class UsageLine:
    id: int
    created_at: datetime
    model: str
    price_version_id: int
    input_tokens: int
    output_tokens: int
    cost: int
    charged: int
    unbilled: int
    outcome: str
    estimated: bool


@dataclass(frozen=True, slots=True)
class FlagRow:
    id: int
    kind: str
    amount: int
    detail: str
    purchase_id: int | None
    created_at: datetime
    cleared_at: datetime | None
    cleared_by: str | None
    clear_note: str | None


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    created_at: datetime
    actor_email: str
    action: str
    target_user_id: int | None
    target_email: str | None
    detail: str
    reason: str


@dataclass(frozen=True, slots=True)
class UserDetail:
    user: UserSummary
    ledger: list[LedgerLineView]  # newest first
    holds: list[HoldRow]
    purchases: list[PurchaseView]
    usage: list[UsageLine]
    flags: list[FlagRow]
    expiring: list[tuple[datetime, int]]
    audit: list[AuditRow]


def user_detail(db: Database, *, user_id: int, limit: int = 100) -> UserDetail:
    """Everything about one account an admin needs, read from one snapshot."""
    with db.read(snapshot=True) as conn:
        row = conn.execute(_user_rows().where(users.c.id == user_id)).first()
        if row is None:
            raise UnknownUser(f"no user {user_id}")
        (summary,) = _summaries(conn, [row])
        entries = [
            LedgerLineView(
                id=r.id,
                created_at=r.created_at,
                kind=r.kind,
                amount=r.amount,
                balance_after=r.balance_after,
                actor=r.actor,
                reason=r.reason,
                reference=r.reference,
            )
            for r in conn.execute(
                sa.select(ledger_entries)
                .where(ledger_entries.c.user_id == user_id)
                .order_by(ledger_entries.c.id.desc())
                .limit(limit)
            )
        ]
        hold_rows = [
            HoldRow(
                id=r.id,
                request_id=r.request_id,
                amount=r.amount,
                status=r.status,
                charged=r.charged,
                created_at=r.created_at,
                expires_at=r.expires_at,
            )
            for r in conn.execute(
                sa.select(holds)
                .where(holds.c.user_id == user_id)
                # Pending first: those are what keeps credits from being available.
                .order_by((holds.c.status == "pending").desc(), holds.c.id.desc())
                .limit(limit)
            )
        ]
        usage = [
            UsageLine(
                id=r.id,
                created_at=r.created_at,
                model=r.model,
                price_version_id=r.price_version_id,
                input_tokens=r.input_tokens,
                output_tokens=r.output_tokens,
                cost=r.cost,
                charged=r.charged,
                unbilled=r.unbilled,
                outcome=r.outcome,
                estimated=bool(r.estimated),
            )
            for r in conn.execute(
                sa.select(usage_events)
                .where(usage_events.c.user_id == user_id)
                .order_by(usage_events.c.id.desc())
                .limit(limit)
            )
        ]
        flags = [
            FlagRow(
                id=r.id,
                kind=r.kind,
                amount=r.amount,
                detail=r.detail,
                purchase_id=r.purchase_id,
                created_at=r.created_at,
                cleared_at=r.cleared_at,
                cleared_by=r.cleared_by,
                clear_note=r.clear_note,
            )
            for r in conn.execute(
                sa.select(account_flags)
                .where(account_flags.c.user_id == user_id)
                .order_by(account_flags.c.cleared_at.is_not(None), account_flags.c.id.desc())
            )
        ]
        audit = _audit_rows(conn, admin_actions.c.target_user_id == user_id, 0, limit)
    return UserDetail(
        user=summary,
        ledger=entries,
        holds=hold_rows,
        purchases=list_purchases(db, user_id=user_id, limit=limit),
        usage=usage,
        flags=flags,
        expiring=ledger.expiring_credits(db, user_id=user_id),
        audit=audit,
    )


# --- the audit log, read ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditPage:
    rows: list[AuditRow]
    total: int
    page: int
    pages: int


def _audit_rows(conn: Connection, where: Any, offset: int, limit: int) -> list[AuditRow]:
    target = users.alias("target")
    return [
        AuditRow(
            id=r.id,
            created_at=r.created_at,
            actor_email=r.actor_email,
            action=r.action,
            target_user_id=r.target_user_id,
            target_email=r.target_email,
            detail=r.detail,
            reason=r.reason,
        )
        for r in conn.execute(
            sa.select(admin_actions, target.c.email.label("target_email"))
            .select_from(
                admin_actions.outerjoin(target, target.c.id == admin_actions.c.target_user_id)
            )
            .where(where)
            .order_by(admin_actions.c.id.desc())
            .offset(offset)
            .limit(limit)
        )
    ]


def list_audit(db: Database, *, page: int = 1, per_page: int = PER_PAGE) -> AuditPage:
    """The audit log, newest first."""
    with db.read(snapshot=True) as conn:
        total = int(
            conn.execute(sa.select(sa.func.count()).select_from(admin_actions)).scalar_one()
        )
        pages = _pages(total, per_page)
        page = min(max(1, page), pages)
        rows = _audit_rows(conn, sa.true(), (page - 1) * per_page, per_page)
    return AuditPage(rows=rows, total=total, page=page, pages=pages)


# --- the overview and spike alerts ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelUsage:
    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    cost: int  # credits the calls cost upstream, billed or not
    charged: int
    unbilled: int


@dataclass(frozen=True, slots=True)
class Spender:
    user_id: int
    email: str | None
    name: str
    spent: int


@dataclass(frozen=True, slots=True)
class SpikeAlert:
    user_id: int
    email: str | None
    name: str
    last_hour: int
    # Credits spent in the 7 days before that hour; the usual hourly spend is this / 168.
    previous_week: int

    @property
    def usual_hourly(self) -> Fraction:
        return spikes.usual_hourly(self.previous_week)


@dataclass(frozen=True, slots=True)
class LimitedAddress:
    """A client address (an IPv6 client: its /64) that reached the daily free trial limit:
    new accounts from it that UTC day with the trial, and without it."""

    address: str
    day: date
    granted: int
    refused: int


@dataclass(frozen=True, slots=True)
class Overview:
    since: datetime
    until: datetime
    user_count: int
    # Sums of ledger entries over the window, by kind (debits as positive numbers).
    credits_sold: int
    credits_granted: int
    credits_spent: int
    credits_clawed_back: int
    credits_expired: int
    adjustments_net: int
    usage_by_model: list[ModelUsage]
    top_spenders: list[Spender]
    spikes: list[SpikeAlert]
    # Addresses that had sign-ups refused the free trial, most recent day first.
    limited_addresses: list[LimitedAddress]


def overview(
    db: Database,
    *,
    spike_factor: float,
    spike_min_credits: int,
    days: int = 30,
    top: int = 10,
    now: datetime | None = None,
) -> Overview:
    """The money over the last `days`: credits sold, granted and spent, upstream cost by model,
    the top spenders, the users whose spending just spiked, and the addresses that reached
    the free trial limit."""
    now = now or utcnow()
    since = now - timedelta(days=days)
    window = sa.and_(ledger_entries.c.created_at >= since, ledger_entries.c.created_at <= now)
    with db.read(snapshot=True) as conn:
        user_count = int(conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one())
        by_kind = {
            kind: int(total or 0)
            for kind, total in conn.execute(
                sa.select(ledger_entries.c.kind, sa.func.sum(ledger_entries.c.amount))
                .where(window)
                .group_by(ledger_entries.c.kind)
            )
        }
        usage = [
            ModelUsage(
                model=r.model,
                calls=int(r.calls),
                input_tokens=int(r.input_tokens or 0),
                output_tokens=int(r.output_tokens or 0),
                cost=int(r.cost or 0),
                charged=int(r.charged or 0),
                unbilled=int(r.unbilled or 0),
            )
            for r in conn.execute(
                sa.select(
                    usage_events.c.model,
                    sa.func.count().label("calls"),
                    sa.func.sum(usage_events.c.input_tokens).label("input_tokens"),
                    sa.func.sum(usage_events.c.output_tokens).label("output_tokens"),
                    sa.func.sum(usage_events.c.cost).label("cost"),
                    sa.func.sum(usage_events.c.charged).label("charged"),
                    sa.func.sum(usage_events.c.unbilled).label("unbilled"),
                )
                .where(usage_events.c.created_at >= since, usage_events.c.created_at <= now)
                .group_by(usage_events.c.model)
                .order_by(sa.func.sum(usage_events.c.cost).desc(), usage_events.c.model)
            )
        ]
        spent = sa.func.sum(-ledger_entries.c.amount).label("spent")
        spenders = [
            Spender(user_id=r.id, email=r.email, name=r.name, spent=int(r.spent))
            for r in conn.execute(
                sa.select(users.c.id, users.c.email, users.c.name, spent)
                .select_from(ledger_entries.join(users, users.c.id == ledger_entries.c.user_id))
                .where(window, ledger_entries.c.kind == EntryKind.SPEND.value)
                .group_by(users.c.id, users.c.email, users.c.name)
                .order_by(spent.desc(), users.c.id)
                .limit(top)
            )
        ]
        limited = [
            LimitedAddress(
                address=r.address, day=r.day, granted=int(r.granted), refused=int(r.refused)
            )
            for r in conn.execute(
                sa.select(trial_addresses)
                .where(trial_addresses.c.day >= since.date(), trial_addresses.c.refused > 0)
                .order_by(
                    trial_addresses.c.day.desc(),
                    trial_addresses.c.refused.desc(),
                    trial_addresses.c.address,
                )
                .limit(MAX_LIMITED_ADDRESSES)
            )
        ]
    return Overview(
        since=since,
        until=now,
        user_count=user_count,
        credits_sold=by_kind.get(EntryKind.PURCHASE.value, 0),
        credits_granted=by_kind.get(EntryKind.GRANT.value, 0),
        credits_spent=-by_kind.get(EntryKind.SPEND.value, 0),
        credits_clawed_back=-by_kind.get(EntryKind.CLAWBACK.value, 0),
        credits_expired=-by_kind.get(EntryKind.EXPIRY.value, 0),
        adjustments_net=by_kind.get(EntryKind.ADJUSTMENT.value, 0),
        usage_by_model=usage,
        top_spenders=spenders,
        spikes=spike_alerts(db, factor=spike_factor, min_credits=spike_min_credits, now=now),
        limited_addresses=limited,
    )


def trial_limit_rule(settings: Settings) -> str:
    """The free trial's limit per address, in words, for the overview."""
    if settings.free_trial_credits <= 0:
        return "No free trial is given (FREE_TRIAL_CREDITS is 0), so nothing is limited."
    limit = settings.trials_per_address_per_day
    if limit <= 0:
        return "Free trials are not limited per address (TRIALS_PER_ADDRESS_PER_DAY is 0)."
    rule = (
        f"At most {limit:,} new accounts a day from one address (an IPv6 /64) get the free "
        "trial; later ones that day are created without it and told why."
    )
    if settings.environment == "dev":
        rule += " In development, sign-ups from this machine itself are not counted."
    return rule


def spike_alerts(
    db: Database, *, factor: float, min_credits: int, now: datetime | None = None
) -> list[SpikeAlert]:
    """Users whose spending spiked in the last hour (domain.spikes has the rule), biggest hour
    first."""
    now = now or utcnow()
    rule = spikes.SpikeRule.of(factor=factor, min_credits=min_credits)
    hour_start = now - timedelta(hours=1)
    week_start = hour_start - timedelta(hours=spikes.BASELINE_HOURS)
    recent = usage_events.c.created_at >= hour_start
    last_hour = sa.func.sum(sa.case((recent, usage_events.c.charged), else_=0))
    before = sa.func.sum(sa.case((recent, 0), else_=usage_events.c.charged))
    with db.read(snapshot=True) as conn:
        rows = conn.execute(
            sa.select(
                users.c.id,
                users.c.email,
                users.c.name,
                last_hour.label("last_hour"),
                before.label("before"),
            )
            .select_from(usage_events.join(users, users.c.id == usage_events.c.user_id))
            .where(usage_events.c.created_at >= week_start, usage_events.c.created_at <= now)
            .group_by(users.c.id, users.c.email, users.c.name)
            .having(last_hour >= rule.least_last_hour)
        ).all()
    alerts = [
        SpikeAlert(
            user_id=r.id,
            email=r.email,
            name=r.name,
            last_hour=int(r.last_hour),
            previous_week=int(r.before or 0),
        )
        for r in rows
    ]
    return sorted(
        (a for a in alerts if rule.is_spike(last_hour=a.last_hour, previous_week=a.previous_week)),
        key=lambda a: (-a.last_hour, a.user_id),
    )
