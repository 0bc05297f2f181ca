"""The periodic jobs with many workers: one run at a time per job, and runs are idempotent."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from aicredits.adapters.db import Database
from aicredits.adapters.tables import utcnow
from aicredits.services import jobs, ledger
from aicredits.services.verify import verify_ledger
from aicredits.settings import Settings
from tests.factories import make_user


@pytest.mark.postgres
def test_a_job_lock_is_held_by_one_worker_at_a_time(pg_url: str) -> None:
    first, second = Database(pg_url), Database(pg_url)
    try:
        with first.job_lock("demo") as mine:
            assert mine
            with second.job_lock("demo") as theirs:
                assert not theirs  # another worker skips this run
            with second.job_lock("another-job") as other:
                assert other  # different jobs do not block each other
        with second.job_lock("demo") as again:
            assert again  # released at the end of the run
    finally:
        first.dispose()
        second.dispose()


def test_jobs_run_by_many_workers_at_once_do_each_thing_once(db: Database) -> None:
    now = utcnow()
    user = make_user(db)
    ledger.grant(
        db,
        user_id=user,
        credits=100,
        key="trial",
        reason="trial",
        expires_at=now + timedelta(seconds=1),
    )
    ledger.reserve(
        db,
        user_id=user,
        credits=30,
        request_id="dead",
        lease=timedelta(seconds=1),
        now=now - timedelta(minutes=5),
    )
    later = now + timedelta(seconds=2)  # the grant's date has passed
    settings = Settings(_env_file=None)
    reports: list[jobs.JobReport] = []
    lock = threading.Lock()
    gate = threading.Barrier(6)

    def worker() -> None:
        gate.wait()
        report = jobs.run_all(db, settings, now=later)
        with lock:
            reports.append(report)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Recovery takes no lock (each hold settles once whoever tries), so one worker may expire
    # the lot while another is still releasing the dead hold: the part that was held comes
    # back after that worker's expiry, and the next run expires it. Nothing twice, nothing left.
    reports.append(jobs.run_all(db, settings, now=later))
    assert sum(r.stale_holds for r in reports) == 1
    assert sum(r.credits_expired for r in reports) == 100
    assert ledger.get_balance(db, user_id=user) == ledger.Balance(user, 0, 0)
    assert jobs.run_all(db, settings, now=later) == jobs.JobReport(0, 0, 0, 0)
    assert verify_ledger(db) == []
