"""Redis stops, then Postgres restarts, each in the middle of steady load. Redis down: the
limiter's configured fail mode (closed: 503 `rate_limiter_unavailable`) and recovery when it
returns. Postgres down: clean 503s, nothing half-applied, and service resumes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from aicredits.adapters.db import Database
from tests.system.clients import CallResult, api_call
from tests.system.conftest import (
    accounts,
    assert_ledger_sound,
    holds_by_request,
    pending_holds,
    usage_by_request,
)
from tests.system.harness import CALL_COST, Account, RunningApp, Services, provision, wait_until

CLIENTS = 8


@dataclass
class Timed:
    started: float
    result: CallResult


@dataclass
class Load:
    """Clients calling the API back to back until told to stop."""

    app: RunningApp
    users: list[Account]
    results: list[Timed] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, user: Account) -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while not self.stop.is_set():
                started = time.monotonic()
                result = api_call(
                    http, self.app.base_url, user.api_key, f"q {i}", stream=i % 2 == 1
                )
                with self._lock:
                    self.results.append(Timed(started, result))
                i += 1
                if not result.ok:
                    time.sleep(0.05)  # a refused client backs off a little, as clients do

    @contextmanager
    def running(self) -> Iterator[Load]:
        with ThreadPoolExecutor(max_workers=len(self.users)) as pool:
            futures = [pool.submit(self._client, user) for user in self.users]
            try:
                yield self
            finally:
                self.stop.set()
                for future in futures:
                    future.result()

    def since(self, moment: float) -> list[CallResult]:
        with self._lock:
            return [t.result for t in self.results if t.started >= moment]


def serving_again(load: Load, since: Callable[[], float]) -> bool:
    """Five successes in a row from calls started after `since()`."""
    recent = load.since(since())
    return len(recent) >= 5 and all(r.ok for r in recent[-5:])


def check_books(db: Database, load: Load, users: list[Account]) -> None:
    """Every 200 has its one usage event, no refused call charged anything, and each user's
    spend is exactly the successful calls."""
    wait_until(lambda: pending_holds(db) == 0, timeout=30, what="no pending holds")
    ok = [t.result.request_id for t in load.results if t.result.ok]
    refused = [t.result.request_id for t in load.results if not t.result.ok and t.result.request_id]
    assert ok and all(ok)
    usage = usage_by_request(db, [rid for rid in ok if rid])
    assert all(len(events) == 1 and events[0].charged == CALL_COST for events in usage.values())
    refused_usage = usage_by_request(db, [rid for rid in refused if rid])
    assert all(events == [] for events in refused_usage.values())
    refused_holds = holds_by_request(db, [rid for rid in refused if rid])
    assert all(h.status in ("released", "expired") for h in refused_holds.values())
    balances = accounts(db, [u.user_id for u in users])
    spent = sum(u.credits - balances[u.user_id].balance for u in users)
    assert spent == CALL_COST * len(ok)
    assert_ledger_sound(db)


@pytest.mark.timeout(180)
def test_redis_stopping_fails_closed_and_recovers(
    system_app: RunningApp, app_db: Database, services: Services
) -> None:
    users = provision(system_app.env, [1_000_000] * CLIENTS, label="redis")
    load = Load(system_app, users)
    with load.running():
        wait_until(lambda: len(load.since(0)) >= 40, timeout=30, what="load under way")
        stopped_at = time.monotonic()
        services.redis.stop()
        time.sleep(3)
        during = load.since(stopped_at + 0.5)
        restarted_at = time.monotonic()
        services.redis.start()
        wait_until(
            lambda: serving_again(load, lambda: restarted_at),
            timeout=30,
            what="service after Redis returned",
        )

    assert during, "no calls were made while Redis was down"
    statuses = {(r.status, r.error_code) for r in during}
    # Fail closed: refused with 503 (no call reaches the model unlimited), never a 500.
    assert (503, "rate_limiter_unavailable") in statuses, statuses
    assert statuses <= {(503, "rate_limiter_unavailable"), (200, None)}, statuses
    check_books(app_db, load, users)


@pytest.mark.timeout(180)
def test_postgres_restarting_fails_cleanly_with_503_and_resumes(
    system_app: RunningApp, app_db: Database, services: Services
) -> None:
    users = provision(system_app.env, [1_000_000] * CLIENTS, label="pg")
    load = Load(system_app, users)
    app_db.dispose()  # our own pooled connections die with the server
    with load.running():
        wait_until(lambda: len(load.since(0)) >= 40, timeout=30, what="load under way")
        stopped_at = time.monotonic()
        services.postgres.stop()
        time.sleep(3)
        during = load.since(stopped_at + 0.5)
        restarted_at = time.monotonic()
        services.postgres.start()
        wait_until(
            lambda: serving_again(load, lambda: restarted_at),
            timeout=45,
            what="service after Postgres returned",
        )
    app_db.dispose()

    assert during, "no calls were made while Postgres was down"
    statuses = {(r.status, r.error_code) for r in during}
    assert statuses == {(503, "database_unavailable")}, statuses
    # Around the restart too: a failure is a clean 503 or a cut stream, never a 500.
    failures = {(r.status, r.error_code) for r in load.since(0) if not r.ok}
    assert failures <= {(503, "database_unavailable"), (200, None), (0, None)}, failures
    check_books(app_db, load, users)
