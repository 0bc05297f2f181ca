"""Usage warnings: record each threshold crossing once per allowance, show the banner,
let the user dismiss it, and email it from a background job when SMTP is configured."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from aicredits.adapters import mailer
from aicredits.adapters.db import Database
from aicredits.adapters.tables import (
    TOP_UP_PREDICATE,
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
)
from aicredits.settings import Settings

logger = logging.getLogger(__name__)

MAX_EMAIL_ATTEMPTS = 8


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


def current_allowance(db: Database, *, user_id: int) -> Allowance:
    """One statement (so one consistent moment, and one round trip: it runs after every
    charge): the balance and the last top-up, both through their indexes."""
    top_up = last_top_up_query(user_id).subquery()
    row = None
    with db.read() as conn:
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


def record_crossings(
    db: Database, settings: Settings, *, user_id: int, now: datetime | None = None
) -> list[int]:
    """Record the thresholds this allowance has reached and were not yet recorded. Returns
    the newly recorded ones. Safe to call after every charge, from any worker."""
    current = current_allowance(db, user_id=user_id)
    reached = crossed(current, settings.threshold_percents)
    if not reached or current.entry_id is None:
        return []
    now = now or utcnow()
    new = []
    with db.transaction() as conn:
        for threshold in reached:
            inserted = conn.execute(
                db.insert_ignoring_conflict(
                    threshold_crossings, index=("user_id", "allowance_entry_id", "threshold")
                )
                .values(
                    user_id=user_id,
                    allowance_entry_id=current.entry_id,
                    threshold=threshold,
                    allowance=current.size,
                    used=current.used,
                    crossed_at=now,
                    email_attempts=0,
                    next_email_at=now if settings.smtp_configured else None,
                    email_error="",
                )
                .returning(threshold_crossings.c.id)
            ).first()
            if inserted is not None:
                new.append(threshold)
    return new


def banner(db: Database, settings: Settings, *, user_id: int) -> Banner | None:
    """The banner to show now: the highest threshold reached in this allowance and not
    dismissed. A user who never had credits, or has none left, sees the blocking one."""
    record_crossings(db, settings, user_id=user_id)
    current = current_allowance(db, user_id=user_id)
    if current.entry_id is None:
        return None  # nothing was ever given: the chat's own error explains
    with db.read() as conn:
        open_thresholds = (
            conn.execute(
                sa.select(threshold_crossings.c.threshold).where(
                    threshold_crossings.c.user_id == user_id,
                    threshold_crossings.c.allowance_entry_id == current.entry_id,
                    threshold_crossings.c.dismissed_at.is_(None),
                )
            )
            .scalars()
            .all()
        )
    if not open_thresholds:
        return None
    top = max(open_thresholds)
    kind = level(top)
    return Banner(
        threshold=top,
        level=kind,
        text=banner_text(top, current),
        dismissible=kind != "blocking",
    )


def dismiss(db: Database, *, user_id: int, threshold: int, now: datetime | None = None) -> bool:
    """Hide a threshold's banner until the next top-up starts a new allowance. The blocking
    banner stays: chat cannot work without credits."""
    if level(threshold) == "blocking":
        return False
    current = current_allowance(db, user_id=user_id)
    if current.entry_id is None:
        return False
    with db.transaction() as conn:
        result = conn.execute(
            sa.update(threshold_crossings)
            .where(
                threshold_crossings.c.user_id == user_id,
                threshold_crossings.c.allowance_entry_id == current.entry_id,
                threshold_crossings.c.threshold <= threshold,
                threshold_crossings.c.dismissed_at.is_(None),
            )
            .values(dismissed_at=now or utcnow())
        )
    return result.rowcount > 0


def _retry_delay(attempts: int) -> timedelta:
    return timedelta(minutes=min(2**attempts, 360))


def send_due_emails(
    db: Database, settings: Settings, *, now: datetime | None = None, batch: int = 50
) -> int:
    """Email crossings that are due (background job). A failure is retried with backoff and
    never affects chat; after MAX_EMAIL_ATTEMPTS it is given up, with the error kept."""
    if not settings.smtp_configured:
        return 0
    now = now or utcnow()
    query = (
        sa.select(
            threshold_crossings.c.id,
            threshold_crossings.c.threshold,
            threshold_crossings.c.allowance,
            threshold_crossings.c.used,
            threshold_crossings.c.email_attempts,
            users.c.email,
            users.c.name,
        )
        .select_from(threshold_crossings.join(users, users.c.id == threshold_crossings.c.user_id))
        .where(
            threshold_crossings.c.emailed_at.is_(None),
            threshold_crossings.c.next_email_at.is_not(None),
            threshold_crossings.c.next_email_at <= now,
        )
        .order_by(threshold_crossings.c.next_email_at)
        .limit(batch)
    )
    sent = 0
    with db.read() as conn:
        due = conn.execute(query).all()
    for row in due:
        # Claim it first (moving next_email_at on), so two workers never both send it.
        with db.transaction() as conn:
            claimed = conn.execute(
                sa.update(threshold_crossings)
                .where(
                    threshold_crossings.c.id == row.id,
                    threshold_crossings.c.emailed_at.is_(None),
                    threshold_crossings.c.next_email_at <= now,
                )
                .values(
                    email_attempts=row.email_attempts + 1,
                    next_email_at=now + _retry_delay(row.email_attempts + 1),
                )
            ).rowcount
        if not claimed or not row.email:
            continue
        try:
            mailer.send(
                settings,
                to=row.email,
                subject=f"You have used {row.threshold}% of your aicredits credits",
                body=_email_body(settings, row.name, row.threshold, row.allowance, row.used),
            )
        except mailer.MailError as exc:
            gave_up = row.email_attempts + 1 >= MAX_EMAIL_ATTEMPTS
            logger.warning(
                "threshold email %s failed (%s)%s", row.id, exc, ", giving up" if gave_up else ""
            )
            with db.transaction() as conn:
                conn.execute(
                    sa.update(threshold_crossings)
                    .where(threshold_crossings.c.id == row.id)
                    .values(
                        email_error=str(exc)[:500],
                        next_email_at=None
                        if gave_up
                        else now + _retry_delay(row.email_attempts + 1),
                    )
                )
            continue
        with db.transaction() as conn:
            conn.execute(
                sa.update(threshold_crossings)
                .where(threshold_crossings.c.id == row.id)
                .values(emailed_at=utcnow(), next_email_at=None, email_error="")
            )
        sent += 1
    return sent


def _email_body(settings: Settings, name: str, threshold: int, size: int, used: int) -> str:
    left = max(size - used, 0)
    return (
        f"Hello {name or 'there'},\n\n"
        f"You have used {threshold}% of your current credits: {left:,} of {size:,} are left.\n"
        f"Buy more at {settings.public_url}/credits\n\n"
        "You get this message once for each threshold, until your next top-up.\n"
    )
