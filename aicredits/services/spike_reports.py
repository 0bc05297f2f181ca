"""Spending spikes, reported to the admins: the periodic job's side of the admin alerts.

Each run asks `admin_views.spike_alerts` who is spiking now and records each of them once per
clock hour (a unique (user_id, hour) row, inserted with ON CONFLICT DO NOTHING), so a run
repeated, or raced by another worker, reports nobody twice. A new report writes a warning
log line and, when SMTP and ADMIN_EMAILS are configured, is emailed to the admins by the
same job, outside any request: claimed first, retried with backoff, never sent twice.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import spike_reports, users, utcnow
from aicredits.domain import spikes
from aicredits.services import admin_views, outbox
from aicredits.settings import Settings

logger = logging.getLogger(__name__)


def hour_of(moment: datetime) -> datetime:
    """The start of the UTC clock hour `moment` falls in: one report per user per hour."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _emails_wanted(settings: Settings) -> bool:
    return settings.smtp_configured and bool(settings.admin_emails)


def record_spikes(db: Database, settings: Settings, *, now: datetime | None = None) -> int:
    """Record every user spiking now who was not yet reported this hour. Returns how many
    were newly recorded."""
    now = now or utcnow()
    hour = hour_of(now)
    alerts = admin_views.spike_alerts(
        db, factor=settings.spike_factor, min_credits=settings.spike_min_credits, now=now
    )
    new = 0
    for alert in alerts:
        with db.transaction() as conn:
            inserted = conn.execute(
                db.insert_ignoring_conflict(spike_reports, index=("user_id", "hour"))
                .values(
                    user_id=alert.user_id,
                    hour=hour,
                    last_hour=alert.last_hour,
                    previous_week=alert.previous_week,
                    reported_at=now,
                    email_attempts=0,
                    next_email_at=now if _emails_wanted(settings) else None,
                    email_error="",
                )
                .returning(spike_reports.c.id)
            ).first()
        if inserted is None:
            continue  # reported already this hour, by an earlier run or another worker
        new += 1
        logger.warning(
            "spending spike: user %s (%s) spent %d credits in the last hour; usually %s an hour",
            alert.user_id,
            alert.email or "no email",
            alert.last_hour,
            spikes.usual_hourly_text(alert.previous_week),
            extra={"user_id": alert.user_id},
        )
    return new


def send_due_emails(
    db: Database, settings: Settings, *, now: datetime | None = None, batch: int = 50
) -> int:
    """Email the admins each report that is due, through the outbox (claimed once, retried
    with backoff, given up after outbox.MAX_ATTEMPTS). Returns how many were sent."""
    if not _emails_wanted(settings):
        return 0
    details = sa.select(
        spike_reports.c.user_id,
        spike_reports.c.reported_at,
        spike_reports.c.last_hour,
        spike_reports.c.previous_week,
        users.c.email,
        users.c.name,
    ).select_from(spike_reports.join(users, users.c.id == spike_reports.c.user_id))

    def compose(row: Any) -> outbox.Email:
        return outbox.Email(
            to=", ".join(settings.admin_emails),
            subject=f"aicredits: spending spike by user {row.user_id}",
            body=_email_body(settings, row),
        )

    return outbox.send_due(
        db,
        settings,
        table=spike_reports,
        details=details,
        compose=compose,
        label="spike",
        now=now,
        batch=batch,
    )


def _email_body(settings: Settings, row: Any) -> str:
    usual = spikes.usual_hourly_text(row.previous_week)
    return (
        f"User {row.user_id} ({row.name or 'no name'}, {row.email or 'no email'}) spent "
        f"{row.last_hour:,} credits in the hour before {row.reported_at:%Y-%m-%d %H:%M} UTC, "
        f"against a usual {usual} an hour over the week before.\n\n"
        f"Look into it: {settings.public_url}/admin/user?id={row.user_id}\n\n"
        "You get one message per user per hour of spiking.\n"
    )
