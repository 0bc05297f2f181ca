"""The spike-report job on SQLite and Postgres: each spiking user is recorded, logged and
emailed to the admins once per hour, however often (or however concurrently) it runs."""

from __future__ import annotations

import email
import email.policy
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from aicredits.adapters.db import Database
from aicredits.adapters.tables import spike_reports, utcnow
from aicredits.services import jobs, ledger, pricing
from aicredits.services import spike_reports as spikes
from aicredits.services.ledger import UsageRecord
from aicredits.services.verify import verify_ledger
from aicredits.settings import Settings
from tests.factories import make_user
from tests.smtp_sink import Sink, smtp_sink

MODEL = "spike-model"
ADMINS = ["boss@example.test", "ops@example.test"]


@pytest.fixture
def sink() -> Iterator[Sink]:
    with smtp_sink() as s:
        yield s


def settings_for(sink: Sink | None = None) -> Settings:
    mail: dict[str, Any] = {}
    if sink is not None:
        mail = {
            "smtp_host": sink.host,
            "smtp_port": sink.port,
            "smtp_from": "aicredits@example.test",
            "smtp_starttls": False,
        }
    return Settings(
        _env_file=None, spike_factor=5.0, spike_min_credits=100, admin_emails=ADMINS, **mail
    )


def spend(db: Database, user_id: int, credits: int, at: datetime) -> None:
    """One metered call charging `credits` at `at`."""
    price = pricing.current_price(db, model=MODEL, at=at)
    hold = ledger.reserve(
        db, user_id=user_id, credits=credits, request_id=str(uuid.uuid4()), now=at
    )
    ledger.settle(
        db,
        hold=hold,
        actual_credits=credits,
        usage=UsageRecord(
            model=MODEL, price_version_id=price.version_id, input_tokens=credits, output_tokens=0
        ),
        now=at,
    )


def quiet_then_heavy(db: Database, now: datetime | None = None) -> tuple[int, int]:
    """A user who spent 1 credit an hour all week and 600 in the last half hour, and one who
    spends the same steady 100 an hour throughout (as of `now`)."""
    pricing.add_price_version(
        db,
        model=MODEL,
        input_per_mtok=1_000_000,
        output_per_mtok=1_000_000,
        actor="config",
        effective_from=datetime(2000, 1, 1, tzinfo=UTC),
    )
    now = now or utcnow()
    quiet = make_user(db, credits=10_000)
    steady = make_user(db, credits=100_000)
    spend(db, quiet, 168, now - timedelta(days=3))
    spend(db, quiet, 600, now - timedelta(minutes=30))
    for n in range(28):
        spend(db, steady, 600, now - timedelta(hours=1, minutes=30) - timedelta(hours=6 * n))
    spend(db, steady, 100, now - timedelta(minutes=20))
    return quiet, steady


def reports(db: Database) -> list[Any]:
    with db.read() as conn:
        return list(conn.execute(sa.select(spike_reports).order_by(spike_reports.c.id)))


def job_runs(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "aicredits_job_runs_total", {"job": "spike-report", "outcome": outcome}
    )
    return value or 0.0


def test_a_spike_is_reported_logged_and_emailed_once_however_often_the_job_runs(
    db: Database, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    quiet, steady = quiet_then_heavy(db)
    settings = settings_for(sink)
    ran_before = job_runs("ran")
    with caplog.at_level(logging.WARNING, logger="aicredits.services.spike_reports"):
        first = jobs.run_all(db, settings)
        second = jobs.run_all(db, settings)
    assert (first.spikes_reported, first.spike_emails_sent) == (1, 1)
    assert (second.spikes_reported, second.spike_emails_sent) == (0, 0)
    (report,) = reports(db)  # the steady user, spending as usual, is not reported
    assert (report.user_id, report.last_hour, report.previous_week) == (quiet, 600, 168)
    assert report.hour == spikes.hour_of(report.reported_at)
    assert report.emailed_at is not None and report.email_attempts == 1
    (raw,) = sink.messages
    message = email.message_from_string(raw, policy=email.policy.default)
    assert message["Subject"] == f"aicredits: spending spike by user {quiet}"
    assert message["To"] == "boss@example.test, ops@example.test"
    body = message.get_body()
    assert body is not None
    text = body.get_content()
    assert "spent 600 credits" in text and "a usual 1.0 an hour" in text
    assert f"http://localhost:3000/admin/user?id={quiet}" in text
    (line,) = [r for r in caplog.records if r.name == "aicredits.services.spike_reports"]
    assert line.levelno == logging.WARNING and getattr(line, "user_id", None) == quiet
    assert "spent 600 credits" in line.getMessage()
    assert steady != quiet
    assert job_runs("ran") == ran_before + 2
    assert verify_ledger(db) == []


def test_two_workers_running_the_jobs_at_once_report_a_spike_once(db: Database, sink: Sink) -> None:
    quiet, _ = quiet_then_heavy(db)
    settings = settings_for(sink)
    gate = threading.Barrier(2)
    results: list[jobs.JobReport] = []
    lock = threading.Lock()

    def worker() -> None:
        gate.wait()
        report = jobs.run_all(db, settings)
        with lock:
            results.append(report)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert sum(r.spikes_reported for r in results) == 1
    assert sum(r.spike_emails_sent for r in results) == 1
    assert [r.user_id for r in reports(db)] == [quiet]
    assert len(sink.messages) == 1


def test_the_same_hour_is_reported_once_and_the_next_hour_again(db: Database) -> None:
    # At hh:50 two hours ago the 600 credits were spent at hh:20; at hh+1:05 they are still
    # within the last 60 minutes, so the user is still spiking in the next clock hour.
    now = spikes.hour_of(utcnow()) - timedelta(hours=2) + timedelta(minutes=50)
    quiet, _ = quiet_then_heavy(db, now)
    settings = settings_for()  # no SMTP: recorded and logged, nothing to email
    assert spikes.record_spikes(db, settings, now=now) == 1
    assert spikes.record_spikes(db, settings, now=now + timedelta(minutes=5)) == 0
    next_hour = spikes.hour_of(now) + timedelta(hours=1, minutes=5)
    assert spikes.record_spikes(db, settings, now=next_hour) == 1
    assert spikes.record_spikes(db, settings, now=next_hour) == 0
    assert [r.hour for r in reports(db)] == [spikes.hour_of(now), spikes.hour_of(next_hour)]
    assert all(r.next_email_at is None and r.emailed_at is None for r in reports(db))
    assert {r.user_id for r in reports(db)} == {quiet}


def test_nobody_is_reported_when_nobody_spikes(db: Database, sink: Sink) -> None:
    pricing.add_price_version(
        db,
        model=MODEL,
        input_per_mtok=1_000_000,
        output_per_mtok=1_000_000,
        actor="config",
        effective_from=datetime(2000, 1, 1, tzinfo=UTC),
    )
    now = utcnow()
    steady = make_user(db, credits=100_000)
    for n in range(28):
        spend(db, steady, 600, now - timedelta(hours=1, minutes=30) - timedelta(hours=6 * n))
    spend(db, steady, 100, now - timedelta(minutes=20))
    small = make_user(db, credits=1_000)
    spend(db, small, 40, now - timedelta(minutes=10))  # new, but below the minimum
    assert jobs.run_all(db, settings_for(sink)).spikes_reported == 0
    assert reports(db) == []
    assert sink.messages == []


def test_a_refused_email_is_retried_later_and_sent_once(db: Database, sink: Sink) -> None:
    quiet_then_heavy(db)
    settings = settings_for(sink)
    now = utcnow()
    sink.refuse = True
    assert spikes.record_spikes(db, settings, now=now) == 1
    assert spikes.send_due_emails(db, settings, now=now) == 0
    (report,) = reports(db)
    assert report.emailed_at is None and "refused" in report.email_error
    assert report.next_email_at > now
    sink.refuse = False
    assert spikes.send_due_emails(db, settings, now=now) == 0  # not due yet
    later = report.next_email_at + timedelta(seconds=1)
    assert spikes.send_due_emails(db, settings, now=later) == 1
    assert spikes.send_due_emails(db, settings, now=later) == 0
    assert len(sink.messages) == 1
    (report,) = reports(db)
    assert (report.email_attempts, report.email_error) == (2, "")
