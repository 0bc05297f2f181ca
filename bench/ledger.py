#!/usr/bin/env python3
"""Ledger throughput: reserve+settle pairs on Postgres, the project against plain psycopg.

Every scenario runs in the same process tree, against the same database, one after the other:

  ledger        aicredits.services.ledger.reserve() + settle(), through SQLAlchemy's pool
  baseline      the very statements the ledger sends (one each), issued directly with psycopg
  for-update    the baseline, with the reservation done the usual way instead of one
                conditional UPDATE: BEGIN; SELECT ... FOR UPDATE; check; UPDATE; INSERT; COMMIT

each on one hot account (every client hits the same row) and on 1,000 accounts. The numbers
are printed, not asserted: machines are noisy, so the ratio within one run is what counts.

    python bench/ledger.py [--seconds 8] [--clients 32] [--processes 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aicredits.adapters import ledger_sql  # noqa: E402
from aicredits.adapters.db import Database  # noqa: E402
from aicredits.adapters.migrations import upgrade_to_head  # noqa: E402
from aicredits.services import ledger, pricing, users  # noqa: E402
from aicredits.services.verify import verify_ledger  # noqa: E402
from aicredits.settings import DEFAULT_MODELS  # noqa: E402

ADMIN_URL = os.environ.get(
    "AICREDITS_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
HOLD = 5
ACTUAL = 3
TTL = timedelta(minutes=10)

# The baseline sends the ledger's own statements (imported, so they cannot drift apart).
# The FOR UPDATE variant reserves the usual way instead: lock the row, check in Python, update.
LOCK_ACCOUNT = "SELECT balance, held FROM credit_accounts WHERE user_id = %s FOR UPDATE"
RESERVE_PLAIN = "UPDATE credit_accounts SET held = held + %s WHERE user_id = %s"
INSERT_HOLD = (
    "INSERT INTO holds (user_id, request_id, amount, status, unbilled, created_at, expires_at) "
    "VALUES (%s, %s, %s, 'pending', 0, %s, %s) RETURNING id"
)


@dataclass
class Setup:
    url: str
    hot_user: int
    spread_users: list[int]
    model: str
    price_version_id: int


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def prepare(accounts: int) -> Setup:
    name = f"aicredits_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq(ADMIN_URL), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    url = f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    upgrade_to_head(url)
    db = Database(url)
    pricing.seed_prices(db, DEFAULT_MODELS)
    price = pricing.current_price(db, model=DEFAULT_MODELS[0].id)
    ids = []
    for i in range(accounts + 1):
        user = users.create_user(db, email=f"bench{i}@example.test")
        ledger.grant(db, user_id=user.id, credits=10**12, key=f"bench:{i}", reason="bench")
        ids.append(user.id)
    db.dispose()
    return Setup(url, ids[0], ids[1:], price.model, price.version_id)


def drop(setup: Setup) -> None:
    name = setup.url.rsplit("/", 1)[1]
    with psycopg.connect(libpq(ADMIN_URL), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- one reserve + settle pair, three ways ---------------------------------------------------


def pair_ledger(db: Database, setup: Setup, user: int, request_id: str) -> None:
    hold = ledger.reserve(db, user_id=user, credits=HOLD, request_id=request_id, lease=TTL)
    usage = ledger.UsageRecord(
        model=setup.model,
        price_version_id=setup.price_version_id,
        input_tokens=100,
        output_tokens=200,
    )
    ledger.settle(db, hold=hold, actual_credits=ACTUAL, usage=usage)


def pair_psycopg(
    conn: psycopg.Connection[Any], setup: Setup, user: int, request_id: str, for_update: bool
) -> None:
    now = datetime.now(UTC)
    if for_update:
        with conn.transaction():
            row = conn.execute(LOCK_ACCOUNT, (user,)).fetchone()
            assert row is not None
            if row[0] - row[1] < HOLD:
                raise RuntimeError("insufficient credits")
            conn.execute(RESERVE_PLAIN, (HOLD, user))
            hold = conn.execute(INSERT_HOLD, (user, request_id, HOLD, now, now + TTL)).fetchone()
    else:
        hold = conn.execute(
            ledger_sql.PG_RESERVE,
            {
                "user_id": user,
                "amount": HOLD,
                "request_id": request_id,
                "now": now,
                "expires_at": now + TTL,
            },
        ).fetchone()
    if hold is None:
        raise RuntimeError("insufficient credits")
    now = datetime.now(UTC)
    settled = conn.execute(
        ledger_sql.PG_SETTLE_WITH_USAGE,
        {
            "hold_id": hold[0],
            "request_id": request_id,
            "amount": HOLD,
            "charged": ACTUAL,
            "unbilled": 0,
            "cost": ACTUAL,
            "spend_amount": -ACTUAL,
            "spend_key": f"spend:{request_id}",
            "actor": f"user:{user}",
            "reason": f"{setup.model} call",
            "now": now,
            "model": setup.model,
            "price_version_id": setup.price_version_id,
            "input_tokens": 100,
            "output_tokens": 200,
            "estimated": False,
            "outcome": "completed",
        },
    ).fetchone()
    if settled is None:
        raise RuntimeError("hold was not pending")


# --- workers -----------------------------------------------------------------------------------


def worker_process(
    kind: str, hot: bool, setup: Setup, threads: int, seconds: float, start: Any, out: Any
) -> None:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    db = Database(setup.url, pool_size=threads, max_overflow=0) if kind == "ledger" else None
    ready = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def client(index: int) -> None:
        conn = None if db else psycopg.connect(libpq(setup.url), autocommit=True)
        rng = random.Random(os.getpid() * 1000 + index)
        mine: list[float] = []
        n = 0
        ready.wait()
        while time.perf_counter() < stop_at[0]:
            user = setup.hot_user if hot else rng.choice(setup.spread_users)
            request_id = f"{kind}-{uuid.uuid4().hex}"
            t0 = time.perf_counter()
            try:
                if db is not None:
                    pair_ledger(db, setup, user, request_id)
                else:
                    assert conn is not None
                    pair_psycopg(conn, setup, user, request_id, for_update=kind == "for-update")
            except Exception as exc:  # noqa: BLE001 - counted and printed, never hidden
                with lock:
                    errors.append(repr(exc))
                continue
            mine.append(time.perf_counter() - t0)
            n += 1
        with lock:
            latencies.extend(mine)
        if conn is not None:
            conn.close()

    pool = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    stop_at[0] = time.perf_counter() + seconds
    ready.wait()
    for t in pool:
        t.join()
    if db is not None:
        db.dispose()
    out.put((latencies, errors[:5], len(errors)))


@dataclass
class Result:
    kind: str
    hot: bool
    pairs: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds


def run_scenario(kind: str, hot: bool, setup: Setup, args: argparse.Namespace) -> Result:
    ctx = multiprocessing.get_context("spawn")
    per_process = max(1, args.clients // args.processes)
    start = ctx.Barrier(args.processes + 1)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=worker_process,
            args=(kind, hot, setup, per_process, args.seconds, start, out),
        )
        for _ in range(args.processes)
    ]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    latencies: list[float] = []
    errors = 0
    samples: list[str] = []
    for _ in procs:
        lat, sample, count = out.get(timeout=args.seconds + 300)
        latencies.extend(lat)
        errors += count
        samples.extend(sample)
    elapsed = min(time.perf_counter() - t0, args.seconds + 0.5)
    for p in procs:
        p.join()
    for s in samples[:3]:
        print(f"    error sample ({kind}): {s}", file=sys.stderr)
    latencies.sort()

    def pct(q: float) -> float:
        return (
            1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0
        )

    return Result(
        kind, hot, len(latencies), max(elapsed, args.seconds), pct(0.5), pct(0.99), errors
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per scenario")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--accounts", type=int, default=1000)
    args = parser.parse_args()

    print(
        f"ledger bench: {args.clients} clients in {args.processes} processes, "
        f"{args.seconds:g}s per scenario, Postgres at {ADMIN_URL.rsplit('@', 1)[-1]}"
    )
    setup = prepare(args.accounts)
    results: dict[tuple[str, bool], Result] = {}
    try:
        for hot in (True, False):
            for kind in ("baseline", "ledger", "for-update"):
                r = run_scenario(kind, hot, setup, args)
                results[(kind, hot)] = r
                where = "hot account" if hot else f"{args.accounts} accounts"
                print(
                    f"  {where:<15} {kind:<11} {r.rate:8.0f} pairs/s   "
                    f"p50 {r.p50_ms:6.1f} ms   p99 {r.p99_ms:6.1f} ms   errors {r.errors}"
                )
        db = Database(setup.url)
        problems = verify_ledger(db)
        db.dispose()
    finally:
        drop(setup)

    print()
    for hot in (True, False):
        where = "hot account" if hot else f"{args.accounts} accounts"
        ratio = results[("ledger", hot)].rate / results[("baseline", hot)].rate
        fu = results[("for-update", hot)].rate / results[("baseline", hot)].rate
        print(f"  {where:<15} ledger/baseline {ratio:5.2f}   for-update/conditional {fu:5.2f}")
    hot_ledger = results[("ledger", True)]
    hot_ratio = hot_ledger.rate / results[("baseline", True)].rate
    spread_ratio = results[("ledger", False)].rate / results[("baseline", False)].rate
    print()
    print(
        f"  goals: ratio >= 0.70 (hot {hot_ratio:.2f}, spread {spread_ratio:.2f}); "
        f"hot account >= 1000 pairs/s ({hot_ledger.rate:.0f}) with p99 <= 50 ms "
        f"({hot_ledger.p99_ms:.1f})"
    )
    print(f"  verify-ledger after the run: {'clean' if not problems else problems[0]}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
