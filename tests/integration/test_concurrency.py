"""No interleaving overspends or double-applies: threads and processes against one balance."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import holds, ledger_entries, utcnow
from aicredits.domain.errors import InsufficientCredits
from aicredits.services import ledger
from aicredits.services.verify import verify_ledger
from tests.factories import make_user
from tests.integration.workers import reserve_many

ATTEMPTS = 200
COVERED = 50
PER_CALL = 7


def run_together(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Start every job at the same instant; return each result or the exception it raised."""
    gate = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        gate.wait()
        try:
            results[i] = jobs[i]()
        except Exception as exc:  # collected and checked by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return results


def pending_holds(db: Database, user_id: int) -> int:
    with db.read() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(holds)
                .where(holds.c.user_id == user_id, holds.c.status == "pending")
            ).scalar_one()
        )


def test_200_threads_reserving_against_a_balance_for_50_get_exactly_50_holds(
    db: Database,
) -> None:
    user = make_user(db, credits=COVERED * PER_CALL)

    def attempt(i: int) -> Callable[[], Any]:
        return lambda: ledger.reserve(db, user_id=user, credits=PER_CALL, request_id=f"t{i}")

    outcomes = run_together([attempt(i) for i in range(ATTEMPTS)])
    held = [o for o in outcomes if isinstance(o, ledger.HoldView)]
    refused = [o for o in outcomes if isinstance(o, InsufficientCredits)]
    others = [o for o in outcomes if o not in held and o not in refused]
    assert others == []
    assert (len(held), len(refused)) == (COVERED, ATTEMPTS - COVERED)
    assert pending_holds(db, user) == COVERED
    bal = ledger.get_balance(db, user_id=user)
    assert (bal.balance, bal.held, bal.available) == (COVERED * PER_CALL, COVERED * PER_CALL, 0)
    assert verify_ledger(db) == []


@pytest.mark.slow
def test_reserving_from_4_processes_at_once_gives_exactly_50_holds(db_url: str) -> None:
    db = Database(db_url)
    user = make_user(db, credits=COVERED * PER_CALL)
    ctx = multiprocessing.get_context("spawn")
    processes = 4
    per_process = ATTEMPTS // processes
    start = ctx.Barrier(processes)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=reserve_many,
            args=(
                db_url,
                user,
                PER_CALL,
                [f"p{p}-{i}" for i in range(per_process)],
                start,
                results,
            ),
        )
        for p in range(processes)
    ]
    outcomes: Counter[str] = Counter()
    errors: list[str] = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            for outcome in results.get(timeout=180):
                if outcome.startswith("error"):
                    errors.append(outcome)
                else:
                    outcomes[outcome] += 1
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    assert errors == []
    assert outcomes == Counter(held=COVERED, refused=ATTEMPTS - COVERED)
    assert pending_holds(db, user) == COVERED
    assert ledger.get_balance(db, user_id=user).available == 0
    assert verify_ledger(db) == []
    db.dispose()


def test_concurrent_settles_and_releases_of_one_hold_apply_once(db: Database) -> None:
    user = make_user(db, credits=1000)
    outcomes: Counter[str] = Counter()
    for round_ in range(10):
        hold = ledger.reserve(db, user_id=user, credits=20, request_id=f"h{round_}")
        before = ledger.get_balance(db, user_id=user).balance
        jobs: list[Callable[[], Any]] = []
        for _ in range(6):
            jobs.append(partial(ledger.settle, db, hold=hold.id, actual_credits=13))
            jobs.append(partial(ledger.release, db, hold_id=hold.id))
        results = run_together(jobs)
        assert not [r for r in results if isinstance(r, Exception)]
        applied_settles = [r for r in results if isinstance(r, ledger.SettleResult) and r.applied]
        final = ledger.get_hold(db, hold_id=hold.id)
        outcomes[final.status] += 1
        after = ledger.get_balance(db, user_id=user)
        assert after.held == 0
        if final.status == "settled":
            assert len(applied_settles) == 1
            assert after.balance == before - 13
        else:
            assert final.status == "released"
            assert applied_settles == []
            assert after.balance == before
    with db.read() as conn:
        spends = conn.execute(
            sa.select(sa.func.count())
            .select_from(ledger_entries)
            .where(ledger_entries.c.kind == "spend")
        ).scalar_one()
    assert spends == outcomes["settled"]
    assert verify_ledger(db) == []


def test_the_same_grant_key_from_many_threads_credits_once(db: Database) -> None:
    user = make_user(db)
    results = run_together(
        [
            lambda: ledger.grant(db, user_id=user, credits=100, key="once", reason="promo")
            for _ in range(20)
        ]
    )
    assert not [r for r in results if isinstance(r, Exception)]
    assert sum(1 for r in results if not r.replayed) == 1
    assert ledger.get_balance(db, user_id=user).balance == 100
    assert verify_ledger(db) == []


def test_concurrent_expiry_runs_expire_each_grant_once(db: Database) -> None:
    now = utcnow()
    users = [make_user(db, credits=5) for _ in range(5)]
    for u in users:
        ledger.grant(
            db,
            user_id=u,
            credits=40,
            key=f"trial{u}",
            reason="trial",
            expires_at=now + timedelta(1),
        )
    later = now + timedelta(days=2)
    reports = run_together([lambda: ledger.expire_due_grants(db, now=later) for _ in range(8)])
    assert not [r for r in reports if isinstance(r, Exception)]
    assert sum(r.credits_expired for r in reports) == 40 * len(users)
    assert all(ledger.get_balance(db, user_id=u).balance == 5 for u in users)
    assert verify_ledger(db) == []


def test_spends_racing_an_expiry_never_go_negative(db: Database) -> None:
    now = utcnow()
    user = make_user(db)
    ledger.grant(
        db, user_id=user, credits=100, key="g", reason="trial", expires_at=now + timedelta(1)
    )
    later = now + timedelta(days=2)

    def spend(i: int) -> Any:
        hold = ledger.reserve(db, user_id=user, credits=10, request_id=f"s{i}", now=later)
        return ledger.settle(db, hold=hold, actual_credits=10, now=later)

    jobs: list[Callable[[], Any]] = [partial(spend, i) for i in range(12)]
    jobs += [lambda: ledger.expire_due_grants(db, now=later) for _ in range(4)]
    results = run_together(jobs)
    unexpected = [
        r for r in results if isinstance(r, Exception) and not isinstance(r, InsufficientCredits)
    ]
    assert unexpected == []
    spent = sum(r.charged for r in results if isinstance(r, ledger.SettleResult))
    expired = sum(r.credits_expired for r in results if isinstance(r, ledger.ExpiryReport))
    assert spent + expired == 100
    assert ledger.get_balance(db, user_id=user).balance == 0
    assert verify_ledger(db) == []
