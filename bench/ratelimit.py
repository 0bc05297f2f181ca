#!/usr/bin/env python3
"""Rate limiter cost and exactness: concurrent callers hammer ONE user's per-minute limit.

Each scenario runs for --seconds, one after the other, on a fresh key:

  memory      MemoryRateLimiter.acquire() + release(), in this process
  baseline    a plain fixed-window check, INCR + EXPIRE NX in one round trip, sent with the
              same Redis client: the cheapest shared limit there is (and not a sliding one)
  redis       RedisRateLimiter.acquire() + release(): one Lua script per call
  redis xN    the same from --processes processes, the callers split between them

Every call has its own request id and is released at once; the concurrency limit is 0 so only
the window binds. The run is shorter than the window, so every limiter must grant exactly
--limit: over-grant = granted - limit is 0, or this exits 1 (a negative one means the run was
too short to reach the limit: lower --limit). Latency is one acquire + release, in ms.

    python bench/ratelimit.py [--seconds 5] [--callers 64] [--limit 500] [--processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aicredits.adapters.ratelimit import (  # noqa: E402
    MemoryRateLimiter,
    RateLimiter,
    RateLimits,
    RedisRateLimiter,
)
from aicredits.domain.errors import RateLimited  # noqa: E402

REDIS_URL = os.environ.get("AICREDITS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
WINDOW = 60.0
USER = 1

# One call: True if granted, False if refused; anything raised is an error.
Call = Callable[[str], Awaitable[bool]]


def client(url: str) -> Redis:
    # The options build_rate_limiter() uses.
    return Redis.from_url(
        url, socket_connect_timeout=0.5, socket_timeout=0.5, health_check_interval=30
    )


def limiter_call(limiter: RateLimiter) -> Call:
    async def call(request_id: str) -> bool:
        try:
            slot = await limiter.acquire(user_id=USER, ip=None, request_id=request_id)
        except RateLimited:
            return False
        await slot.release()
        return True

    return call


def fixed_window_call(redis_client: Redis, key: str, limit: int) -> Call:
    async def call(request_id: str) -> bool:
        pipe = redis_client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, int(WINDOW), nx=True)
        count, _ = await pipe.execute()
        return int(count) <= limit

    return call


@dataclass
class Tally:
    latencies: list[float]
    granted: int = 0
    refused: int = 0
    errors: int = 0
    first_error: str = ""

    def add(self, other: Tally) -> None:
        self.latencies.extend(other.latencies)
        self.granted += other.granted
        self.refused += other.refused
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error


async def hammer(call: Call, callers: int, seconds: float) -> Tally:
    """`callers` tasks call `call` back to back until `seconds` have passed."""
    tally = Tally([])
    stop_at = time.perf_counter() + seconds
    tag = uuid.uuid4().hex[:8]

    async def caller(index: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            # The memory limiter never suspends: without this, one task would run alone.
            await asyncio.sleep(0)
            n += 1
            t0 = time.perf_counter()
            try:
                granted = await call(f"bench-{tag}-{index}-{n}")
            except Exception as exc:  # noqa: BLE001 - counted and printed, never hidden
                tally.errors += 1
                tally.first_error = tally.first_error or repr(exc)
                continue
            tally.latencies.append(time.perf_counter() - t0)
            if granted:
                tally.granted += 1
            else:
                tally.refused += 1

    await asyncio.gather(*(caller(i) for i in range(callers)))
    return tally


def worker_process(
    url: str, prefix: str, limits: RateLimits, callers: int, seconds: float, start: Any, out: Any
) -> None:
    async def main() -> Tally:
        limiter = RedisRateLimiter(client(url), limits, fail_open=False, key_prefix=prefix)
        try:
            await limiter.acquire(user_id=USER + 1, ip=None, request_id="warm-up")  # connect
            await asyncio.to_thread(start.wait)
            return await hammer(limiter_call(limiter), callers, seconds)
        finally:
            await limiter.aclose()

    tally = asyncio.run(main())
    out.put((tally.latencies, tally.granted, tally.refused, tally.errors, tally.first_error))


def across_processes(
    url: str, prefix: str, limits: RateLimits, args: argparse.Namespace
) -> tuple[Tally, float]:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(args.processes + 1), ctx.Queue()
    per_process = max(1, args.callers // args.processes)
    procs = [
        ctx.Process(
            target=worker_process,
            args=(url, prefix, limits, per_process, args.seconds, start, out),
        )
        for _ in range(args.processes)
    ]
    for p in procs:
        p.start()
    start.wait(timeout=120)
    t0 = time.perf_counter()
    tally = Tally([])
    for _ in procs:
        tally.add(Tally(*out.get(timeout=args.seconds + 120)))
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    return tally, elapsed


def pct(latencies: list[float], q: float) -> float:
    if not latencies:
        return 0.0
    ordered = sorted(latencies)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, tally: Tally, elapsed: float, limit: int) -> dict[str, float]:
    calls = tally.granted + tally.refused
    over = tally.granted - limit
    p50, p99 = pct(tally.latencies, 0.5), pct(tally.latencies, 0.99)
    print(
        f"  {name:<13} {calls:8d} calls {calls / elapsed:8.0f}/s   granted {tally.granted:5d}   "
        f"refused {tally.refused:8d}   over-grant {over:+d}   "
        f"p50 {p50:7.3f} ms   p99 {p99:7.3f} ms   errors {tally.errors}"
    )
    if tally.first_error:
        print(f"    error sample ({name}): {tally.first_error}", file=sys.stderr)
    return {"over": over, "p50": p50, "p99": p99, "errors": tally.errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario")
    parser.add_argument("--callers", type=int, default=64, help="concurrent asyncio tasks")
    parser.add_argument("--limit", type=int, default=500, help=f"requests per {WINDOW:g} s")
    parser.add_argument("--processes", type=int, default=2, help="0 skips that scenario")
    args = parser.parse_args()
    if args.seconds >= WINDOW:
        parser.error(f"--seconds must be shorter than the {WINDOW:g} s window")

    probe = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        probe.ping()
    except (redis.RedisError, OSError) as exc:
        print(f"Redis is not reachable at {REDIS_URL}: {exc}", file=sys.stderr)
        return 2

    limits = RateLimits(args.limit, 0, 0, window_seconds=WINDOW)
    run_prefix = f"aicredits:bench:{uuid.uuid4().hex[:8]}:"
    print(
        f"rate limiter bench: {args.callers} callers on one user, limit {args.limit} per "
        f"{WINDOW:g} s, {args.seconds:g} s per scenario, Redis at {REDIS_URL.rsplit('@', 1)[-1]}"
    )

    async def in_process() -> dict[str, dict[str, float]]:
        results: dict[str, dict[str, float]] = {}
        shared = client(REDIS_URL)
        # The client connects (and loads the script) before the clock starts.
        memory = MemoryRateLimiter(limits)
        limiter = RedisRateLimiter(shared, limits, fail_open=False, key_prefix=run_prefix + "r:")
        await limiter.acquire(user_id=USER + 1, ip=None, request_id="warm-up")
        scenarios: list[tuple[str, Call]] = [
            ("memory", limiter_call(memory)),
            ("baseline", fixed_window_call(shared, run_prefix + "fw", args.limit)),
            ("redis", limiter_call(limiter)),
        ]
        try:
            for name, call in scenarios:
                t0 = time.perf_counter()
                tally = await hammer(call, args.callers, args.seconds)
                results[name] = report(name, tally, time.perf_counter() - t0, args.limit)
        finally:
            await limiter.aclose()
        return results

    try:
        results = asyncio.run(in_process())
        if args.processes > 0:
            name = f"redis x{args.processes}"
            tally, elapsed = across_processes(REDIS_URL, run_prefix + "p:", limits, args)
            results[name] = report(name, tally, elapsed, args.limit)
    finally:
        keys = list(probe.scan_iter(match=run_prefix + "*"))
        if keys:
            probe.delete(*keys)
        probe.close()

    checked = {k: v for k, v in results.items() if k != "baseline"}
    base, lim = results["baseline"], results["redis"]
    print()
    print(
        f"  redis/baseline   p50 {lim['p50'] / base['p50']:5.2f}   "
        f"p99 {lim['p99'] / base['p99']:5.2f}"
    )
    bad = [k for k, v in checked.items() if v["over"] != 0 or v["errors"]]
    if bad:
        print(f"  FAILED: over-grant or errors in {', '.join(bad)} (must be exactly 0)")
        return 1
    print(f"  over-grant: 0 in {', '.join(checked)} (exact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
