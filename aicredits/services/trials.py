"""The free trial's limit per client address, and what a user refused the trial is told.

A new account takes one of its address's trials for the day inside the transaction that
creates it (`claim_trial`), so the decision and the account exist together or not at all:
a crash afterwards is repaired by the next sign-in's `ensure_trial_grant`, which gives the
trial to an account that was not refused it and never to one that was. Only the sign-in
that creates an account counts; signing in again, or linking a second provider, does not.

A client address is personal data: its daily counts are kept for ADDRESS_DAYS_KEPT days,
as far back as the admin overview lists them, and then deleted by the periodic jobs
(`forget_old_addresses`). Only the current day's count decides a trial.

The claim is an insert of the (address, day) row that ignores a conflict, then one
conditional `UPDATE ... SET granted = granted + 1 WHERE ... AND granted < :limit`. On
Postgres the second of two concurrent claims waits on the first's row lock and re-checks
the condition on the committed row; SQLite's write transactions take turns. Either way no
more than the limit pass, whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database, reading
from aicredits.adapters.tables import ledger_entries, trial_addresses, users, utcnow
from aicredits.domain.trials import address_bucket, trial_day, withheld_trial_notice

# Days an address's daily trial counts are kept: the admin overview's window
# (admin_views.overview) reaches this far back.
ADDRESS_DAYS_KEPT = 30


@dataclass(frozen=True, slots=True)
class TrialClaim:
    """Whether a new account from `address` (its bucket) gets the trial, and how many from
    that address had got it that day before it."""

    address: str
    granted: bool
    others: int


def claim_trial(
    db: Database, conn: Connection, *, client_address: str | None, limit: int, now: datetime
) -> TrialClaim:
    """Count a new account against its address's trials for the day, in the caller's
    transaction (the one creating the account). `limit` is at least 1."""
    if limit < 1:
        raise ValueError("a trial limit is at least 1 (0 means no limit: do not claim)")
    address = address_bucket(client_address)
    row_key = (trial_addresses.c.address == address, trial_addresses.c.day == trial_day(now))
    conn.execute(
        db.insert_ignoring_conflict(trial_addresses, index=("address", "day")).values(
            address=address, day=trial_day(now), granted=0, refused=0
        )
    )
    taken = conn.execute(
        sa.update(trial_addresses)
        .where(*row_key, trial_addresses.c.granted < limit)
        .values(granted=trial_addresses.c.granted + 1)
        .returning(trial_addresses.c.granted)
    ).first()
    if taken is not None:
        return TrialClaim(address=address, granted=True, others=int(taken.granted) - 1)
    refused = conn.execute(
        sa.update(trial_addresses)
        .where(*row_key)
        .values(refused=trial_addresses.c.refused + 1)
        .returning(trial_addresses.c.granted)
    ).one()
    return TrialClaim(address=address, granted=False, others=int(refused.granted))


def forget_old_addresses(db: Database, *, now: datetime | None = None) -> int:
    """Delete the addresses' daily counts older than ADDRESS_DAYS_KEPT days (a periodic
    job). Returns how many (address, day) rows went."""
    cutoff = trial_day((now or utcnow()) - timedelta(days=ADDRESS_DAYS_KEPT))
    with db.transaction() as conn:
        result = conn.execute(sa.delete(trial_addresses).where(trial_addresses.c.day < cutoff))
    return int(result.rowcount)


def trial_notice(
    target: Database | Connection, *, user_id: int, now: datetime | None = None
) -> str | None:
    """Why this user has no free trial, while it matters: from the refusal until the account
    first gets credits some other way (a purchase, an admin's grant). None otherwise."""
    has_entries = sa.exists().where(ledger_entries.c.user_id == users.c.id)
    with reading(target) as conn:
        row = conn.execute(
            sa.select(
                users.c.trial_withheld_at,
                users.c.trial_withheld_others,
                has_entries.label("has_entries"),
            ).where(users.c.id == user_id)
        ).first()
    if row is None or row.trial_withheld_at is None or row.has_entries:
        return None
    return withheld_trial_notice(
        others=int(row.trial_withheld_others or 0),
        withheld_at=row.trial_withheld_at,
        now=now or utcnow(),
    )
