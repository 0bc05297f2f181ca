#!/usr/bin/env python3
"""Scaling: metered requests per second through the real app in production mode with 1, 2
and 4 workers, against the fake upstream, side by side with the ratio to 1 worker.

Everything is private to the run (tests/system/harness.py): a Postgres cluster and a Redis
on free ports, the fake upstream (no artificial delay: a 40-token reply as fast as it can),
and `python -m aicredits prod` (or `reflex run --env prod --backend-only` before that
command exists) with N Granian workers. Client processes (threads inside each) send
non-streamed `POST /v1/chat/completions` back to back for a fixed time, each call
authenticated by an API key, rate-limited through Redis, reserved and settled in the ledger.
Each user has a large balance and the calls spread over many users, so no account is hot.

    python bench/scale.py [--workers 1,2,4] [--seconds 10] [--procs 4] [--threads 8]

Prints numbers; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aicredits.adapters.db import Database  # noqa: E402
from aicredits.services.verify import verify_ledger  # noqa: E402
from tests.system.harness import (  # noqa: E402
    MODEL,
    app_env,
    private_services,
    provision,
    running_app,
)

USERS = 64
WARM_UP_SECONDS = 2.0


@dataclass
class ClientReport:
    calls: int
    errors: int
    latencies: list[float]


def _client_thread(
    base_url: str, keys: list[str], until: float, measure_from: float
) -> ClientReport:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say something short."}]}
    latencies: list[float] = []
    errors = 0
    i = 0
    with httpx.Client(timeout=60) as client:
        while (now := time.monotonic()) < until:
            key = keys[i % len(keys)]
            i += 1
            response = client.post(
                f"{base_url}/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            )
            elapsed = time.monotonic() - now
            if now >= measure_from:
                if response.status_code == 200:
                    latencies.append(elapsed)
                else:
                    errors += 1
    return ClientReport(len(latencies), errors, latencies)


def _client_process(args: tuple[str, list[str], float, float, int]) -> ClientReport:
    """One client process: `threads` threads, each calling back to back."""
    import threading

    base_url, keys, until, measure_from, threads = args
    reports: list[ClientReport] = []
    lock = threading.Lock()

    def run(offset: int) -> None:
        mine = keys[offset::threads] or keys
        report = _client_thread(base_url, mine, until, measure_from)
        with lock:
            reports.append(report)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return ClientReport(
        sum(r.calls for r in reports),
        sum(r.errors for r in reports),
        [latency for r in reports for latency in r.latencies],
    )


@dataclass
class Level:
    workers: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def measure(base_url: str, keys: list[str], *, seconds: float, procs: int, threads: int) -> Level:
    start = time.monotonic() + 1.0  # let every process get going first
    measure_from = start + WARM_UP_SECONDS
    until = measure_from + seconds
    jobs = [(base_url, keys[n::procs], until, measure_from, threads) for n in range(procs)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        reports = pool.map(_client_process, jobs)
    latencies = sorted(latency for r in reports for latency in r.latencies)
    calls = len(latencies)
    p99 = latencies[min(calls - 1, int(calls * 0.99))] if calls else float("nan")
    return Level(
        workers=0,
        rps=calls / seconds,
        p50_ms=1000 * statistics.median(latencies) if calls else float("nan"),
        p99_ms=1000 * p99,
        errors=sum(r.errors for r in reports),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per level")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--threads", type=int, default=8, help="client threads per process")
    args = parser.parse_args()
    levels = [int(n) for n in args.workers.split(",")]

    results: list[Level] = []
    with private_services() as services:
        database_url = services.postgres.create_database(f"scale_{uuid.uuid4().hex[:6]}")
        # No per-minute or in-flight limits: the limiter still runs its Redis script per call
        # (the concurrency check is on), but nothing is refused.
        env = app_env(
            services,
            database_url,
            RATE_LIMIT_CONCURRENT=str(args.threads * args.procs),
            HOLD_LEASE_SECONDS="30",
            UPSTREAM_MAX_SECONDS="300",
            JOBS_INTERVAL_SECONDS="60",
        )
        keys: list[str] = []
        for n in levels:
            log = services.base / f"app-{n}.log"
            with running_app(env, workers=n, log=log) as app:
                if not keys:  # the database is migrated by the first launch
                    keys = [a.api_key for a in provision(env, [10**9] * USERS, label="scale")]
                level = measure(
                    app.base_url, keys, seconds=args.seconds, procs=args.procs, threads=args.threads
                )
                level.workers = n
                results.append(level)
                print(
                    f"  {n} worker(s)  {level.rps:8.0f} req/s   p50 {level.p50_ms:6.1f} ms   "
                    f"p99 {level.p99_ms:6.1f} ms   errors {level.errors}",
                    flush=True,
                )
        db = Database(database_url)
        problems = verify_ledger(db)
        db.dispose()

    base = results[0].rps
    print()
    print(f"  {'workers':>7}  {'req/s':>8}  {'vs 1':>5}  {'p50 ms':>7}  {'p99 ms':>7}  errors")
    for level in results:
        print(
            f"  {level.workers:>7}  {level.rps:8.0f}  {level.rps / base:5.2f}  "
            f"{level.p50_ms:7.1f}  {level.p99_ms:7.1f}  {level.errors}"
        )
    print(
        f"\n  {args.procs} client processes x {args.threads} threads, {args.seconds:.0f} s per "
        f"level after {WARM_UP_SECONDS:.0f} s of warm-up, {USERS} users; "
        "fake upstream with no delay"
    )
    print(f"  verify-ledger after the run: {'clean' if not problems else problems[0]}")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
