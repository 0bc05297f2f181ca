"""Usage warnings: record each threshold crossing once per allowance, show the banner,
let the user dismiss it, and email it from a background job when SMTP is configured."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database, insert_ignoring_conflict, reading
from aicredits.adapters.tables import (
    TOP_UP_PREDICATE,
    auto_topup_settings,
    credit_accounts,
    ledger_entries,
    threshold_crossings,
    users,
    utcnow,
)
from aicredits.domain.allowance import (
    Allowance,
    Level,
    allowance,
    banner_text,
    crossed,
    level,
    share,
)
from aicredits.services import outbox
from aicredits.settings import Settings


@dataclass(frozen=True, slots=True)
class Banner:
    threshold: int
    level: Level
    text: str
    dismissible: bool


def last_top_up_query(user_id: int) -> sa.Select[Any]:
    """The entry that started the user's current allowance: read after every charge, and
    served by the partial index ix_ledger_entries_top_ups (its predicate, literally)."""
    return (
        sa.select(ledger_entries.c.id, ledger_entries.c.balance_after)
        .where(ledger_entries.c.user_id == user_id, sa.text(TOP_UP_PREDICATE))
        .order_by(ledger_entries.c.id.desc())
        .limit(1)
    )


def current_allowance(target: Database | Connection, *, user_id: int) -> Allowance:
    """One statement (so one consistent moment, and one round trip: it runs after every
    charge): the balance and the last top-up, both through their indexes."""
    top_up = last_top_up_query(user_id).subquery()
    row = None
    with reading(target) as conn:
        row = conn.execute(
            sa.select(
                credit_accounts.c.balance,
                sa.select(top_up.c.id).scalar_subquery(),
                sa.select(top_up.c.balance_after).scalar_subquery(),
            ).where(credit_accounts.c.user_id == user_id)
        ).first()
    balance, top_up_id, size = row if row is not None else (0, None, 0)
    return allowance(
        top_up_entry_id=top_up_id,
        size_after_top_up=size if top_up_id is not None else 0,
        balance=balance or 0,
    )


def may_need_recording(
    settings: Settings,
    *,
    balance: int,
    top_up_id: int | None,
    top_up_balance_after: int,
) -> bool:
    """Whether record_crossings could record anything after a charge, judged from what the
    settle itself returned (no round trip): False when no threshold is reached in this
    allowance, as after most charges. (Once one is reached, every charge checks again: the
    record is idempotent, and the next threshold may be reached.)"""
    current = allowance(
        top_up_entry_id=top_up_id,
        size_after_top_up=top_up_balance_after if top_up_id is not None else 0,
        balance=balance,
    )
    return bool(crossed(current, settings.threshold_percents))


def record_crossings(
    db: Database, settings: Settings, *, user_id: int, now: datetime | None = None
) -> list[int]:
    """Record the thresholds this allowance has reached and were not yet recorded, queueing
    their emails. Returns the newly recorded ones. Called after every charge (the gateway)
    and every expiry (the jobs), from any worker; safe to call again."""
    current = current_allowance(db, user_id=user_id)
    if not crossed(current, settings.threshold_percents):
        return []
    with db.transaction() as conn:
        return _record(conn, settings, user_id=user_id, current=current, now=now or utcnow())


def _record(
    conn: Connection, settings: Settings, *, user_id: int, current: Allowance, now: datetime
) -> list[int]:
    reached = crossed(current, settings.threshold_percents)
    if not reached or current.entry_id is None:
        return []
    # A user with no address gets no email queued: it could never be sent.
    emailed = settings.smtp_configured and bool(
        conn.execute(sa.select(users.c.email).where(users.c.id == user_id)).scalar()
    )
    new = []
    for threshold in reached:
        inserted = conn.execute(
            insert_ignoring_conflict(
                conn.dialect.name,
                threshold_crossings,
                index=("user_id", "allowance_entry_id", "threshold"),
            )
            .values(
                user_id=user_id,
                allowance_entry_id=current.entry_id,
                threshold=threshold,
                allowance=current.size,
                used=current.used,
                crossed_at=now,
                email_attempts=0,
                next_email_at=now if emailed else None,
                email_error="",
            )
            .returning(threshold_crossings.c.id)
        ).first()
        if inserted is not None:
            new.append(threshold)
    return new


@dataclass(frozen=True, slots=True)
class UsageStatus:
    """Where the user stands in this allowance: the level of the highest threshold reached
    ("" below the first; what the header's badge shows, dismissed or not) and the banner to
    show (None when none is reached, or it was dismissed)."""

    level: Level | Literal[""]
    banner: Banner | None
    # What went wrong with auto top-up (services.auto_topup), shown with the usage banner.
    topup: TopUpNotice | None = None


@dataclass(frozen=True, slots=True)
class TopUpNotice:
    kind: str  # failed | action_required | disabled | cap_reached
    text: str
    pack_id: str


def banner(target: Database | Connection, settings: Settings, *, user_id: int) -> Banner | None:
    """The banner to show now: the highest threshold reached in this allowance and not
    dismissed. A user with no credits left sees the blocking one; one who never had any
    sees none (the chat's own error explains).

    Read-only, and from the balance itself, so it is right at once after any change (a
    charge, an expiry, an admin's adjustment), whether or not its crossing is recorded yet;
    only dismissals are read from the recorded crossings."""
    return status(target, settings, user_id=user_id).banner


def status(target: Database | Connection, settings: Settings, *, user_id: int) -> UsageStatus:
    """The usage level and the banner, in one read (see `banner`), and auto top-up's notice."""
    with reading(target, snapshot=True) as conn:
        usage = _usage_status(conn, settings, user_id=user_id)
        notice = conn.execute(
            sa.select(
                auto_topup_settings.c.notice_kind,
                auto_topup_settings.c.notice,
                auto_topup_settings.c.pack_id,
            ).where(auto_topup_settings.c.user_id == user_id, auto_topup_settings.c.notice != "")
        ).first()
    if notice is None:
        return usage
    return replace(usage, topup=TopUpNotice(notice.notice_kind, notice.notice, notice.pack_id))


def _usage_status(conn: Connection, settings: Settings, *, user_id: int) -> UsageStatus:
    current = current_allowance(conn, user_id=user_id)
    if current.entry_id is None:
        return UsageStatus("", None)  # nothing was ever given: the chat's error explains
    reached = crossed(current, settings.threshold_percents)
    if not reached:
        return UsageStatus("", None)
    dismissed = conn.execute(
        sa.select(sa.func.max(threshold_crossings.c.threshold)).where(
            threshold_crossings.c.user_id == user_id,
            threshold_crossings.c.allowance_entry_id == current.entry_id,
            threshold_crossings.c.dismissed_at.is_not(None),
        )
    ).scalar()
    reached_level = level(max(reached))
    # Dismissing a banner dismisses every threshold up to its own (see `dismiss`).
    open_thresholds = [t for t in reached if dismissed is None or t > dismissed]
    if not open_thresholds:
        return UsageStatus(reached_level, None)
    top = max(open_thresholds)
    kind = level(top)
    return UsageStatus(
        reached_level,
        Banner(
            threshold=top,
            level=kind,
            text=banner_text(top, current),
            dismissible=kind != "blocking",
        ),
    )


def dismiss(
    db: Database,
    settings: Settings,
    *,
    user_id: int,
    threshold: int,
    now: datetime | None = None,
) -> bool:
    """Hide a threshold's banner, and those below it, until the next top-up starts a new
    allowance. The blocking banner stays: chat cannot work without credits. The crossings
    are recorded first (they may not be yet: an expiry, an admin's adjustment), so the
    dismissal is kept with them."""
    if level(threshold) == "blocking":
        return False
    now = now or utcnow()
    with db.transaction() as conn:
        current = current_allowance(conn, user_id=user_id)
        if current.entry_id is None:
            return False
        _record(conn, settings, user_id=user_id, current=current, now=now)
        result = conn.execute(
            sa.update(threshold_crossings)
            .where(
                threshold_crossings.c.user_id == user_id,
                threshold_crossings.c.allowance_entry_id == current.entry_id,
                threshold_crossings.c.threshold <= threshold,
                threshold_crossings.c.dismissed_at.is_(None),
            )
            .values(dismissed_at=now)
        )
    return result.rowcount > 0


def send_due_emails(
    db: Database, settings: Settings, *, now: datetime | None = None, batch: int = 50
) -> int:
    """Email crossings that are due (background job), through the outbox: a failure is
    retried with backoff and never affects chat; after outbox.MAX_ATTEMPTS it is given up,
    with the error kept."""
    if not settings.smtp_configured:
        return 0
    details = sa.select(
        threshold_crossings.c.threshold,
        threshold_crossings.c.allowance,
        threshold_crossings.c.used,
        users.c.email,
        users.c.name,
    ).select_from(threshold_crossings.join(users, users.c.id == threshold_crossings.c.user_id))

    def compose(row: sa.Row[Any]) -> outbox.Email | None:
        if not row.email:
            return None
        return outbox.Email(
            to=row.email,
            subject=f"You have used {row.threshold}% of your aicredits credits",
            body=_email_body(settings, row.name, row.threshold, row.allowance, row.used),
        )

    return outbox.send_due(
        db,
        settings,
        table=threshold_crossings,
        details=details,
        compose=compose,
        label="threshold",
        now=now,
        batch=batch,
    )


def _email_body(settings: Settings, name: str, threshold: int, size: int, used: int) -> str:
    left = share(size=size, used=used).left
    return (
        f"Hello {name or 'there'},\n\n"
        f"You have used {threshold}% of your current credits: {left:,} of {size:,} are left.\n"
        f"Buy more at {settings.public_url}/credits\n\n"
        "You get this message once for each threshold, until your next top-up.\n"
    )
