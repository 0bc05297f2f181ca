"""The admin console's Payments page: the last reconciliation with Stripe, the unmatched
payments waiting for an admin, and the two actions on them (run reconciliation now, clear an
unmatched payment with a note), each audited like every admin action."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import StripeFailure
from aicredits.adapters.tables import unmatched_payments, utcnow
from aicredits.domain.ledger import require_reason
from aicredits.domain.money import format_money
from aicredits.services import reconciliation
from aicredits.services.admin_actions import (
    ActionKind,
    ActionResult,
    AdminActor,
    AdminError,
    earlier_use,
    once_per_form,
    record_action,
    require_form_token,
)
from aicredits.services.reconciliation import JOB_WINDOW, KeptRun
from aicredits.settings import Settings

UNMATCHED_SHOWN = 100
_LOCK = "reconcile-payments"  # the daily job's lock: one run at a time, whoever starts it


class UnknownUnmatchedPayment(AdminError):
    code = "unknown_unmatched_payment"


class UnmatchedAlreadyCleared(AdminError):
    code = "unmatched_already_cleared"


class ReconciliationBusy(AdminError):
    code = "reconciliation_busy"


class ReconciliationFailed(AdminError):
    code = "reconciliation_failed"


@dataclass(frozen=True, slots=True)
class UnmatchedView:
    id: int
    checkout_session_id: str
    event_id: str | None
    amount: int | None
    currency: str | None
    reason: str
    detail: str
    source: str
    created_at: datetime
    cleared_at: datetime | None
    cleared_by: str | None
    clear_note: str | None

    @property
    def paid(self) -> str:
        if self.amount is None:
            return ""
        return format_money(self.amount, self.currency or "usd")


@dataclass(frozen=True, slots=True)
class PaymentsView:
    last_run: KeptRun | None
    unmatched: list[UnmatchedView]
    open_unmatched: int


def payments_view(db: Database) -> PaymentsView:
    """The last reconciliation, and the unmatched payments: open ones first, newest first."""
    with db.read() as conn:
        rows = conn.execute(
            sa.select(unmatched_payments)
            .order_by(
                unmatched_payments.c.cleared_at.is_not(None),
                unmatched_payments.c.created_at.desc(),
                unmatched_payments.c.id.desc(),
            )
            .limit(UNMATCHED_SHOWN)
        ).all()
        open_count = conn.execute(
            sa.select(sa.func.count())
            .select_from(unmatched_payments)
            .where(unmatched_payments.c.cleared_at.is_(None))
        ).scalar_one()
    return PaymentsView(
        last_run=reconciliation.last_run(db),
        unmatched=[_unmatched(r) for r in rows],
        open_unmatched=int(open_count),
    )


def _unmatched(row: sa.Row[object]) -> UnmatchedView:
    m = row._mapping
    return UnmatchedView(
        id=m["id"],
        checkout_session_id=m["checkout_session_id"],
        event_id=m["event_id"],
        amount=m["amount"],
        currency=m["currency"],
        reason=m["reason"],
        detail=m["detail"],
        source=m["source"],
        created_at=m["created_at"],
        cleared_at=m["cleared_at"],
        cleared_by=m["cleared_by"],
        clear_note=m["clear_note"],
    )


def clear_unmatched(
    db: Database,
    *,
    actor: AdminActor,
    unmatched_id: int,
    note: str,
    form_token: str,
    now: datetime | None = None,
) -> ActionResult:
    """Mark an unmatched payment as dealt with (refunded at Stripe, credited by hand, ...),
    with a note. It stays on record; nothing is credited."""
    now = now or utcnow()
    token = require_form_token(form_token)
    note = require_reason(note)

    def act(conn: Connection) -> ActionResult:
        row = conn.execute(
            sa.select(unmatched_payments).where(unmatched_payments.c.id == unmatched_id)
        ).first()
        if row is None:
            raise UnknownUnmatchedPayment("There is no such unmatched payment.")
        first = earlier_use(conn, token, ActionKind.CLEAR_UNMATCHED, None)
        if first is not None:
            return first
        paid = _unmatched(row).paid
        result = record_action(
            conn,
            actor=actor,
            action=ActionKind.CLEAR_UNMATCHED,
            target_user_id=None,
            detail=f"cleared unmatched payment #{row.id} ({row.checkout_session_id}"
            + (f", {paid}" if paid else "")
            + f", {row.reason})",
            reason=note,
            token=token,
            now=now,
        )
        cleared = conn.execute(
            sa.update(unmatched_payments)
            .where(
                unmatched_payments.c.id == unmatched_id, unmatched_payments.c.cleared_at.is_(None)
            )
            .values(cleared_at=now, cleared_by=actor.email[:200], clear_note=note[:500])
        )
        if cleared.rowcount != 1:
            raise UnmatchedAlreadyCleared("This unmatched payment was already cleared.")
        return result

    return once_per_form(db, token, act)


def run_reconciliation(
    db: Database,
    settings: Settings,
    *,
    actor: AdminActor,
    form_token: str,
    now: datetime | None = None,
) -> ActionResult:
    """Reconcile the last week with Stripe now, fixing what it can (as the daily job does),
    under the job's lock; audited. The same form submitted twice runs once."""
    now = now or utcnow()
    token = require_form_token(form_token)
    with db.read() as conn:
        first = earlier_use(conn, token, ActionKind.RUN_RECONCILIATION, None)
    if first is not None:
        return first
    with db.job_lock(_LOCK) as mine:
        if not mine:
            raise ReconciliationBusy("A reconciliation is running already. Reload in a minute.")
        try:
            report = reconciliation.reconcile(
                db, settings, since=now - JOB_WINDOW, fix=True, trigger="admin", now=now
            )
        except StripeFailure as exc:
            raise ReconciliationFailed(f"Stripe could not be read: {exc}") from exc
    detail = (
        f"reconciled payments since {report.since:%Y-%m-%d %H:%M} UTC: "
        f"{len(report.discrepancies)} discrepancies, {report.fixed} fixed"
    )

    def act(conn: Connection) -> ActionResult:
        again = earlier_use(conn, token, ActionKind.RUN_RECONCILIATION, None)
        if again is not None:
            return again
        return record_action(
            conn,
            actor=actor,
            action=ActionKind.RUN_RECONCILIATION,
            target_user_id=None,
            detail=detail,
            reason="run from the Payments page",
            token=token,
            now=now,
        )

    return once_per_form(db, token, act)
