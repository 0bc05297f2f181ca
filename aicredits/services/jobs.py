"""The periodic jobs: settle holds whose worker died (every few seconds, so a crash strands
credits for seconds), and, less often, expire due grants, send threshold emails, forget old
sign-in attempts and the trial counts of addresses past their 30 days, report spending
spikes to the admins, and once a day reconcile the payments with Stripe
(services.reconciliation). Every worker runs the schedule; a Postgres advisory lock per job
lets exactly one of them do each run, and every piece of work inside is also claimed by a
conditional update (or a unique key), so a run repeated or raced changes nothing twice."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from aicredits.adapters import metrics
from aicredits.adapters.blocking import run_blocking
from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import StripeFailure
from aicredits.services import (
    auth,
    auto_topup,
    ledger,
    overage,
    receipts,
    reconciliation,
    recovery,
    spike_reports,
    thresholds,
    trials,
)
from aicredits.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobReport:
    stale_holds: int
    credits_expired: int
    emails_sent: int
    sign_ins_forgotten: int
    spikes_reported: int = 0
    spike_emails_sent: int = 0
    payment_discrepancies: int = 0
    overage_reported: int = 0
    trial_addresses_forgotten: int = 0


def _locked(db: Database, name: str, job: Callable[[], int]) -> int:
    with db.job_lock(name) as mine:
        if not mine:
            metrics.job_run(job=name, outcome="skipped")
            return 0
        try:
            done = job()
        except Exception:
            metrics.job_run(job=name, outcome="failed")
            raise
        metrics.job_run(job=name, outcome="ran", items=done)
        return done


def _report_spikes(db: Database, settings: Settings, now: datetime | None) -> tuple[int, int]:
    """New spike reports, then the admins' emails for any that are due (this run's or
    earlier ones being retried), under one lock."""
    emails = 0

    def job() -> int:
        nonlocal emails
        reported = spike_reports.record_spikes(db, settings, now=now)
        emails = spike_reports.send_due_emails(db, settings, now=now)
        return reported

    return _locked(db, "spike-report", job), emails


def recover_holds(db: Database, settings: Settings, *, now: datetime | None = None) -> int:
    """Settle the holds whose worker died and finish their chat replies. Returns how many
    holds it closed."""

    def job() -> int:
        report = recovery.recover(db, lease=timedelta(seconds=settings.hold_lease_seconds), now=now)
        if report.holds or report.replies_finished:
            logger.info("recovery: %s", report)
        return report.holds

    return _locked(db, "recover-holds", job)


def _expire_grants(db: Database, settings: Settings, now: datetime | None) -> int:
    """Expire due grants, then record the usage warnings the expiry crossed (no charge
    follows an emptied balance to record them). Returns the credits expired."""
    report = ledger.expire_due_grants(db, now=now)
    for user_id in sorted(report.users):
        thresholds.record_crossings(db, settings, user_id=user_id, now=now)
    return report.credits_expired


def _reconcile_payments(db: Database, settings: Settings, now: datetime | None) -> int:
    """The daily reconciliation with Stripe (it decides whether a day has passed). Stripe
    being unreachable fails this run alone: it is kept with its error and retried later."""
    try:
        return reconciliation.run_job(db, settings, now=now)
    except StripeFailure as exc:
        logger.warning("reconciling payments with Stripe failed: %s", exc)
        return 0


def _report_overage(db: Database, settings: Settings, now: datetime | None) -> int:
    """Metered plans' finished periods, reported to Stripe (after the expiry above)."""
    try:
        return overage.report_due(db, settings, now=now)
    except StripeFailure as exc:
        logger.warning("reporting metered overage to Stripe failed: %s", exc)
        return 0


def run_auto_topups(db: Database, settings: Settings, *, now: datetime | None = None) -> int:
    """Start the auto top-ups that are due and finish those in flight, then send the emails
    about failed ones. Returns how many top-ups it started."""

    def job() -> int:
        started = auto_topup.run_due(db, settings, now=now)
        auto_topup.send_due_emails(db, settings, now=now)
        return started

    return _locked(db, "auto-top-up", job)


async def top_up_forever(db: Database, settings: Settings, *, interval: float) -> None:
    """Inside the app: look for accounts below their auto top-up threshold every `interval`
    seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            await run_blocking(run_auto_topups, db, settings)
        except Exception:
            logger.exception("an auto top-up run failed")


def run_all(db: Database, settings: Settings, *, now: datetime | None = None) -> JobReport:
    """One run of every periodic job. `now` (default: the clock, read by each job) is the
    moment every job takes as the present."""
    stale_holds = recover_holds(db, settings, now=now)
    credits_expired = _locked(db, "expire-grants", lambda: _expire_grants(db, settings, now))
    emails_sent = _locked(
        db, "threshold-emails", lambda: thresholds.send_due_emails(db, settings, now=now)
    )
    emails_sent += _locked(
        db, "receipt-emails", lambda: receipts.send_due_emails(db, settings, now=now)
    )
    sign_ins_forgotten = _locked(
        db, "forget-sign-ins", lambda: auth.forget_old_login_attempts(db, now=now)
    )
    addresses_forgotten = _locked(
        db, "forget-trial-addresses", lambda: trials.forget_old_addresses(db, now=now)
    )
    spikes, spike_emails = _report_spikes(db, settings, now)
    discrepancies = _locked(
        db, "reconcile-payments", lambda: _reconcile_payments(db, settings, now)
    )
    overage_reported = _locked(db, "report-overage", lambda: _report_overage(db, settings, now))
    return JobReport(
        overage_reported=overage_reported,
        stale_holds=stale_holds,
        credits_expired=credits_expired,
        emails_sent=emails_sent,
        sign_ins_forgotten=sign_ins_forgotten,
        spikes_reported=spikes,
        spike_emails_sent=spike_emails,
        payment_discrepancies=discrepancies,
        trial_addresses_forgotten=addresses_forgotten,
    )


async def recover_forever(db: Database, settings: Settings, *, interval: float) -> None:
    """Inside the app: settle dead workers' holds every `interval` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            await run_blocking(recover_holds, db, settings)
        except Exception:
            logger.exception("recovering lapsed holds failed")


async def run_forever(db: Database, settings: Settings, *, interval: float) -> None:
    """Inside the app: run the jobs every `interval` seconds until cancelled."""
    while True:
        try:
            report = await run_blocking(run_all, db, settings)
            if (
                report.stale_holds
                or report.credits_expired
                or report.emails_sent
                or report.spikes_reported
                or report.spike_emails_sent
                or report.payment_discrepancies
                or report.overage_reported
            ):
                logger.info("jobs: %s", report)
        except Exception:
            logger.exception("a periodic job run failed")
        await asyncio.sleep(interval)
