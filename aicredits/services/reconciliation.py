"""Reconciliation: set Stripe's Checkout Sessions and refunds of a window against the
purchases table, and say what does not agree.

The kinds of discrepancy:

* `paid_not_credited`: paid at Stripe, a session of ours (a purchase row, or the app's marker
  with its pack's price), not credited here. `fix` credits it through the webhook's own
  fulfilment function, keyed by the session id, so a second fix changes nothing.
* `credited_not_paid`: credited here, but unpaid, expired or unknown at Stripe.
* `refund_not_clawed_back`: refunded at Stripe by more than this app has recorded and taken
  back for the purchase.
* `amount_mismatch`: a session of ours paid at another amount or currency than its purchase.
* `unmatched_payment`: a paid session that is not ours, and every unmatched payment not yet
  cleared by an admin.

Each run is kept (reconciliation_runs) for the admin console. Without STRIPE_SECRET_KEY there
is no Stripe to walk: only the unmatched payments are reported.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa

from aicredits.adapters import metrics
from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import (
    CheckoutSession,
    CheckoutSessionNotFound,
    StripeApi,
    StripeFailure,
)
from aicredits.adapters.stripe_cards import SUCCEEDED, stripe_cards
from aicredits.adapters.tables import purchases, reconciliation_runs, unmatched_payments, utcnow
from aicredits.domain.money import format_money
from aicredits.services import auto_topup, fulfilment, payment_trust
from aicredits.services.fulfilment import FulfilmentStatus
from aicredits.services.payment_errors import UnknownCheckoutSession
from aicredits.services.payment_trust import UnmatchedSession
from aicredits.services.purchases import PurchaseView, purchase_of_session
from aicredits.services.stripe_config import stripe_client
from aicredits.settings import Settings

logger = logging.getLogger(__name__)

PAID_NOT_CREDITED = "paid_not_credited"
CREDITED_NOT_PAID = "credited_not_paid"
REFUND_NOT_CLAWED_BACK = "refund_not_clawed_back"
AMOUNT_MISMATCH = "amount_mismatch"
UNMATCHED_PAYMENT = "unmatched_payment"
KINDS = (
    PAID_NOT_CREDITED,
    CREDITED_NOT_PAID,
    REFUND_NOT_CLAWED_BACK,
    AMOUNT_MISMATCH,
    UNMATCHED_PAYMENT,
)
# The periodic job's rhythm: once a day over the last week; after a failure, an hour's wait.
JOB_EVERY = timedelta(days=1)
JOB_RETRY_AFTER = timedelta(hours=1)
JOB_WINDOW = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class Discrepancy:
    kind: str
    session_id: str
    detail: str
    fixed: bool = False


@dataclass(slots=True)
class ReconciliationReport:
    since: datetime
    started_at: datetime
    finished_at: datetime | None = None
    trigger: str = "cli"
    fix: bool = False
    stripe_checked: bool = False
    sessions_checked: int = 0
    refunds_checked: int = 0
    discrepancies: list[Discrepancy] = field(default_factory=list)
    error: str = ""

    @property
    def fixed(self) -> int:
        return sum(1 for d in self.discrepancies if d.fixed)

    @property
    def outstanding(self) -> list[Discrepancy]:
        """What is still wrong after this run (what it fixed is not)."""
        return [d for d in self.discrepancies if not d.fixed]

    @property
    def clean(self) -> bool:
        return not self.error and not self.outstanding


def reconcile(
    db: Database,
    settings: Settings,
    *,
    since: datetime,
    fix: bool = False,
    trigger: str = "cli",
    now: datetime | None = None,
) -> ReconciliationReport:
    """Walk Stripe's sessions and refunds created since `since`, set them against the
    purchases, and keep the report. Raises StripeFailure when Stripe cannot be read (the
    failed run is kept too)."""
    now = now or utcnow()
    report = ReconciliationReport(since=since, started_at=now, trigger=trigger, fix=fix)
    try:
        if not settings.simulated_checkout:
            api = stripe_client(settings)
            report.stripe_checked = True
            _check_sessions(db, settings, api, report, now)
            _check_refunds(db, api, report)
        _report_unmatched(db, report)
    except StripeFailure as exc:
        report.error = f"Stripe could not be read: {exc}"[:500]
        _keep(db, report)
        raise
    report.finished_at = utcnow()
    for found in report.discrepancies:
        metrics.reconciliation_discrepancy(kind=found.kind)
    _keep(db, report)
    if report.outstanding:
        logger.warning(
            "reconciliation since %s: %d discrepancies (%d fixed)",
            since.isoformat(),
            len(report.discrepancies),
            report.fixed,
        )
    return report


def _check_sessions(
    db: Database, settings: Settings, api: StripeApi, report: ReconciliationReport, now: datetime
) -> None:
    seen: set[str] = set()
    for session in api.list_checkout_sessions(created_from=int(report.since.timestamp())):
        report.sessions_checked += 1
        seen.add(session.id)
        with db.read() as conn:
            row = purchase_of_session(conn, session.id)
        if row is None:
            _check_session_without_row(db, settings, api, session, report, now)
        else:
            _check_session_with_row(db, settings, row, session, report, now)
    # Credited here but not among Stripe's sessions of the window (made just before it, or
    # unknown to Stripe): each is asked about by id.
    with db.read() as conn:
        credited = conn.execute(
            sa.select(purchases).where(
                purchases.c.fulfilled_at.is_not(None),
                purchases.c.simulated.is_(False),
                purchases.c.created_at >= report.since,
            )
        ).all()
    for raw in credited:
        row = PurchaseView.from_row(raw)
        if row.checkout_session_id in seen:
            continue
        if row.checkout_session_id.startswith(auto_topup.KEY_PREFIX):
            # An auto top-up: paid by an off-session PaymentIntent, not a Checkout Session.
            _check_top_up(settings, row, report)
            continue
        try:
            session = api.retrieve_checkout_session(row.checkout_session_id)
        except CheckoutSessionNotFound:
            report.discrepancies.append(
                Discrepancy(
                    CREDITED_NOT_PAID, row.checkout_session_id, "Stripe has no such session"
                )
            )
            continue
        report.sessions_checked += 1
        _check_session_with_row(db, settings, row, session, report, now)


def _check_top_up(settings: Settings, row: PurchaseView, report: ReconciliationReport) -> None:
    """A credited auto top-up against its PaymentIntent at Stripe: succeeded, at its price."""
    if not row.payment_intent_id:
        report.discrepancies.append(
            Discrepancy(CREDITED_NOT_PAID, row.checkout_session_id, "no PaymentIntent recorded")
        )
        return
    payment = stripe_cards(settings.stripe_secret_key, settings.stripe_api_base).retrieve_payment(
        row.payment_intent_id
    )
    report.sessions_checked += 1
    if payment.outcome != SUCCEEDED:
        report.discrepancies.append(
            Discrepancy(
                CREDITED_NOT_PAID,
                row.checkout_session_id,
                f"auto top-up credited, its PaymentIntent {payment.id} is {payment.outcome}",
            )
        )
    elif (payment.amount, payment.currency) != (row.amount, row.currency.lower()):
        report.discrepancies.append(
            Discrepancy(
                AMOUNT_MISMATCH,
                row.checkout_session_id,
                f"paid {format_money(payment.amount, payment.currency or 'usd')} at Stripe for"
                f" an auto top-up of {format_money(row.amount, row.currency)}",
            )
        )


def _check_session_with_row(
    db: Database,
    settings: Settings,
    row: PurchaseView,
    session: CheckoutSession,
    report: ReconciliationReport,
    now: datetime,
) -> None:
    paid = session.payment_status == "paid"
    if paid and (session.amount_total, session.currency) != (row.amount, row.currency.lower()):
        report.discrepancies.append(
            Discrepancy(
                AMOUNT_MISMATCH,
                session.id,
                f"paid {format_money(session.amount_total or 0, session.currency or 'usd')} at "
                f"Stripe for a purchase of {format_money(row.amount, row.currency)}",
            )
        )
        return
    if paid and row.fulfilled_at is None:
        _paid_not_credited(db, settings, session, report, now, f"the {row.pack_id} pack")
    elif not paid and row.fulfilled_at is not None:
        report.discrepancies.append(
            Discrepancy(
                CREDITED_NOT_PAID,
                session.id,
                f"{row.credits:,} credits given; at Stripe the session is "
                f"{session.status or 'unknown'} and {session.payment_status}",
            )
        )


def _check_session_without_row(
    db: Database,
    settings: Settings,
    api: StripeApi,
    session: CheckoutSession,
    report: ReconciliationReport,
    now: datetime,
) -> None:
    if session.payment_status != "paid":
        return  # nothing was paid: nothing to set against anything
    try:
        _claims, pack = payment_trust.judge_session(settings, session, api)
    except UnmatchedSession as refused:
        payment_trust.record_unmatched(db, refused, source="reconcile", now=now)
        return  # listed with every open unmatched payment
    _paid_not_credited(db, settings, session, report, now, f"the {pack.id} pack (no row here)")


def _paid_not_credited(
    db: Database,
    settings: Settings,
    session: CheckoutSession,
    report: ReconciliationReport,
    now: datetime,
    what: str,
) -> None:
    detail = f"paid {format_money(session.amount_total or 0, session.currency or 'usd')} for {what}"
    fixed = False
    if report.fix:
        try:
            result = fulfilment.fulfil_checkout_session(
                db, settings, session, from_stripe=True, now=now
            )
        except (UnmatchedSession, UnknownCheckoutSession) as exc:
            detail += f"; not credited: {exc}"
        else:
            fixed = result.status == FulfilmentStatus.CREDITED
            if fixed:
                detail += f"; credited {result.credits:,} credits now"
    report.discrepancies.append(Discrepancy(PAID_NOT_CREDITED, session.id, detail, fixed))


def _check_refunds(db: Database, api: StripeApi, report: ReconciliationReport) -> None:
    refunded: dict[str, int] = defaultdict(int)
    for refund in api.list_refunds(created_from=int(report.since.timestamp())):
        report.refunds_checked += 1
        if refund.status == "succeeded" and refund.payment_intent_id:
            refunded[refund.payment_intent_id] += refund.amount
    if not refunded:
        return
    with db.read() as conn:
        rows = conn.execute(
            sa.select(purchases).where(purchases.c.payment_intent_id.in_(sorted(refunded)))
        ).all()
    for raw in rows:
        row = PurchaseView.from_row(raw)
        at_stripe = refunded[row.payment_intent_id or ""]
        # The refunds of the window are a lower bound of the payment's refunds so far.
        if row.fulfilled_at is not None and row.amount_refunded < at_stripe:
            report.discrepancies.append(
                Discrepancy(
                    REFUND_NOT_CLAWED_BACK,
                    row.checkout_session_id,
                    f"refunded {format_money(at_stripe, row.currency)} at Stripe; "
                    f"{format_money(row.amount_refunded, row.currency)} recorded here, "
                    f"{row.credits_clawed_back:,} credits taken back",
                )
            )


def _report_unmatched(db: Database, report: ReconciliationReport) -> None:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(unmatched_payments)
            .where(unmatched_payments.c.cleared_at.is_(None))
            .order_by(unmatched_payments.c.id)
        ).all()
    for row in rows:
        paid = format_money(row.amount or 0, row.currency or "usd")
        report.discrepancies.append(
            Discrepancy(
                UNMATCHED_PAYMENT,
                row.checkout_session_id,
                f"{paid}, credited nothing: {row.reason} ({row.detail})",
            )
        )


def _keep(db: Database, report: ReconciliationReport) -> None:
    with db.transaction() as conn:
        conn.execute(
            sa.insert(reconciliation_runs).values(
                trigger=report.trigger[:20],
                since=report.since,
                started_at=report.started_at,
                finished_at=report.finished_at,
                fix=report.fix,
                stripe_checked=report.stripe_checked,
                sessions_checked=report.sessions_checked,
                refunds_checked=report.refunds_checked,
                discrepancies=len(report.discrepancies),
                fixed=report.fixed,
                report=json.dumps([asdict(d) for d in report.discrepancies]),
                error=report.error,
            )
        )


@dataclass(frozen=True, slots=True)
class KeptRun:
    """A reconciliation run as kept, for the admin console."""

    id: int
    trigger: str
    since: datetime
    started_at: datetime
    finished_at: datetime | None
    fix: bool
    stripe_checked: bool
    sessions_checked: int
    refunds_checked: int
    fixed: int
    error: str
    discrepancies: list[Discrepancy]


def last_run(db: Database) -> KeptRun | None:
    with db.read() as conn:
        row = conn.execute(
            sa.select(reconciliation_runs)
            .order_by(reconciliation_runs.c.started_at.desc(), reconciliation_runs.c.id.desc())
            .limit(1)
        ).first()
    if row is None:
        return None
    try:
        items = [Discrepancy(**item) for item in json.loads(row.report or "[]")]
    except (ValueError, TypeError):
        items = []
    return KeptRun(
        id=row.id,
        trigger=row.trigger,
        since=row.since,
        started_at=row.started_at,
        finished_at=row.finished_at,
        fix=row.fix,
        stripe_checked=row.stripe_checked,
        sessions_checked=row.sessions_checked,
        refunds_checked=row.refunds_checked,
        fixed=row.fixed,
        error=row.error,
        discrepancies=items,
    )


def job_is_due(db: Database, now: datetime) -> bool:
    """Whether the daily job should run: no run kept in the last day, nor a failed one in
    the last hour."""
    with db.read() as conn:
        last = conn.execute(
            sa.select(reconciliation_runs.c.started_at, reconciliation_runs.c.error)
            .order_by(reconciliation_runs.c.started_at.desc())
            .limit(1)
        ).first()
    if last is None:
        return True
    wait = JOB_RETRY_AFTER if last.error else JOB_EVERY
    return last.started_at <= now - wait


def run_job(db: Database, settings: Settings, *, now: datetime | None = None) -> int:
    """The daily reconciliation, fixing what it can; the periodic job runs it under its lock.
    Returns how many discrepancies it found."""
    now = now or utcnow()
    if not job_is_due(db, now):
        return 0
    report = reconcile(db, settings, since=now - JOB_WINDOW, fix=True, trigger="job", now=now)
    return len(report.discrepancies)
