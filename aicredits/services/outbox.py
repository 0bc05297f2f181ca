"""Emails queued in the rows of a table, sent by the periodic jobs outside any request.

A table is an outbox when it has the columns `email_attempts`, `next_email_at` (when its
email is next due; NULL when there is nothing to send, or it was given up), `emailed_at` and
`email_error`. A row is queued by setting `next_email_at`. `send_due` claims each due row
with one conditional UPDATE (on its attempt count and due time, moving the due time on), so
of several workers exactly one sends it; a refused email is retried with backoff and given
up after MAX_ATTEMPTS, its last error kept. A row with nobody to send to is closed at once,
never polled again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from aicredits.adapters import mailer
from aicredits.adapters.db import Database
from aicredits.adapters.tables import utcnow
from aicredits.settings import Settings

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
NO_RECIPIENT = "no email address"


@dataclass(frozen=True, slots=True)
class Email:
    to: str
    subject: str
    body: str


def retry_delay(attempts: int) -> timedelta:
    """How long after the `attempts`-th try the next one is due: doubling, at most 6 hours."""
    return timedelta(minutes=min(2**attempts, 360))


def send_due(
    db: Database,
    settings: Settings,
    *,
    table: sa.Table,
    details: sa.Select[Any],
    compose: Callable[[sa.Row[Any]], Email | None],
    label: str,
    now: datetime | None = None,
    batch: int = 50,
) -> int:
    """Send the emails of `table` that are due. `details` selects what `compose` needs to
    write a row's email (compose returns None when there is nobody to send it to); `label`
    names the emails in the logs. Returns how many were sent. Never raises a mail error."""
    now = now or utcnow()
    query = (
        details.add_columns(
            table.c.id.label("outbox_id"), table.c.email_attempts.label("outbox_attempts")
        )
        .where(
            table.c.emailed_at.is_(None),
            table.c.next_email_at.is_not(None),
            table.c.next_email_at <= now,
        )
        .order_by(table.c.next_email_at)
        .limit(batch)
    )
    with db.read() as conn:
        due = conn.execute(query).all()
    sent = 0
    for row in due:
        row_id, attempts = row.outbox_id, row.outbox_attempts + 1
        if not _claim(db, table, row_id, attempts=attempts, now=now):
            continue  # another worker has it, or sent it
        email = compose(row)
        if email is None:
            _update(db, table, row_id, next_email_at=None, email_error=NO_RECIPIENT)
            continue
        try:
            mailer.send(settings, to=email.to, subject=email.subject, body=email.body)
        except mailer.MailError as exc:
            gave_up = attempts >= MAX_ATTEMPTS
            logger.warning(
                "%s email %s failed (%s)%s", label, row_id, exc, ", giving up" if gave_up else ""
            )
            _update(
                db,
                table,
                row_id,
                email_error=str(exc)[:500],
                next_email_at=None if gave_up else now + retry_delay(attempts),
            )
            continue
        _update(db, table, row_id, emailed_at=utcnow(), next_email_at=None, email_error="")
        sent += 1
    return sent


def _claim(db: Database, table: sa.Table, row_id: int, *, attempts: int, now: datetime) -> bool:
    """Take the row for this try, moving its due time on first: a worker that read it at the
    same time finds it changed and skips it, and one that dies after the claim leaves it due
    again after the backoff."""
    with db.transaction() as conn:
        claimed = conn.execute(
            sa.update(table)
            .where(
                table.c.id == row_id,
                table.c.emailed_at.is_(None),
                table.c.next_email_at <= now,
                table.c.email_attempts == attempts - 1,
            )
            .values(email_attempts=attempts, next_email_at=now + retry_delay(attempts))
        ).rowcount
    return bool(claimed)


def _update(db: Database, table: sa.Table, row_id: int, **values: Any) -> None:
    with db.transaction() as conn:
        conn.execute(sa.update(table).where(table.c.id == row_id).values(**values))
