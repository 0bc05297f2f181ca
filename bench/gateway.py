#!/usr/bin/env python3
"""Gateway overhead: the official openai client calling the fake upstream directly, and the
same client calling it through our /v1 API (auth, rate limits, reserve, settle), in one run.

Three processes: the fake upstream (zero latency), our API (uvicorn, Postgres, Redis
limits), and this client. Measured at the client, in interleaved rounds (direct, gateway,
direct, gateway, ...) after a warm-up; each figure is the median of the round figures.

    python bench/gateway.py [--rounds 7] [--calls 40] [--seconds 5] [--no-redis]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aicredits.adapters.db import Database  # noqa: E402
from aicredits.adapters.migrations import upgrade_to_head  # noqa: E402
from aicredits.services import api_keys, ledger, pricing, users  # noqa: E402
from aicredits.settings import DEFAULT_MODELS  # noqa: E402

ADMIN_URL = os.environ.get(
    "AICREDITS_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("AICREDITS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL = DEFAULT_MODELS[0].id
MESSAGES: Any = [{"role": "user", "content": "Say something short."}]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not start")


@contextmanager
def process(args: list[str], env: dict[str, str], ready: str) -> Iterator[None]:
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_for(ready)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def serve_api() -> None:
    """Child mode: our API routes alone, on uvicorn, configured from the environment."""
    import uvicorn

    from aicredits.api.routes import build_api
    from aicredits.settings import get_settings

    uvicorn.run(
        build_api(get_settings()),
        host="127.0.0.1",
        port=int(os.environ["BENCH_API_PORT"]),
        log_level="warning",
        http="h11",
    )


@dataclass
class Paths:
    direct: openai.OpenAI
    gateway: openai.OpenAI
    direct_async: openai.AsyncOpenAI
    gateway_async: openai.AsyncOpenAI


def first_token(client: openai.OpenAI) -> float:
    start = time.perf_counter()
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                return time.perf_counter() - start
    finally:
        for _ in stream:  # read to the end, so the call completes and is settled
            pass
    raise RuntimeError("no token arrived")


def whole_call(client: openai.OpenAI) -> float:
    start = time.perf_counter()
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def interleaved(
    paths: Paths, measure: Callable[[openai.OpenAI], float], rounds: int, calls: int
) -> dict[str, dict[str, float]]:
    for client in (paths.direct, paths.gateway):  # warm-up: connections, prepared statements
        for _ in range(10):
            measure(client)
    per_round: dict[str, dict[str, list[float]]] = {
        name: {"p50": [], "p99": []} for name in ("direct", "gateway")
    }
    for _ in range(rounds):
        for name, client in (("direct", paths.direct), ("gateway", paths.gateway)):
            samples = [measure(client) * 1000 for _ in range(calls)]
            per_round[name]["p50"].append(pct(samples, 0.5))
            per_round[name]["p99"].append(pct(samples, 0.99))
    return {
        name: {stat: statistics.median(values) for stat, values in stats.items()}
        for name, stats in per_round.items()
    }


async def throughput(
    client: openai.AsyncOpenAI, concurrency: int, seconds: float
) -> tuple[float, float]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            except openai.APIError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    if errors:
        print(f"    ({errors} errors)")
    return len(latencies) / elapsed, pct(latencies, 0.99) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=40, help="calls per path per round")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-redis", action="store_true", help="in-process limits")
    args = parser.parse_args()

    name = f"aicredits_bench_gw_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    db_url = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    db_url = f"{db_url}/{name}"
    try:
        upgrade_to_head(db_url)
        db = Database(db_url)
        pricing.seed_prices(db, DEFAULT_MODELS)
        user = users.create_user(db, email="bench@example.test", email_verified=True)
        ledger.grant(db, user_id=user.id, credits=10**12, key="bench", reason="bench")
        key = api_keys.create_api_key(db, user_id=user.id, name="bench").secret
        db.dispose()

        upstream_port, api_port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{upstream_port}"
        api = f"http://127.0.0.1:{api_port}"
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "OPENAI_BASE_URL": f"{upstream}/v1",
            "REDIS_URL": "" if args.no_redis else REDIS_URL,
            "RATE_LIMIT_USER_PER_MINUTE": "10000000",
            "RATE_LIMIT_IP_PER_MINUTE": "10000000",
            "RATE_LIMIT_CONCURRENT": "1000",
            "BENCH_API_PORT": str(api_port),
        }
        upstream_cmd = [
            sys.executable, "-m", "aicredits", "fake-upstream", "--port", str(upstream_port),
            "--reply-tokens", "20",
        ]  # fmt: skip
        api_cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-api"]
        with (
            process(upstream_cmd, env, f"{upstream}/_fake/stats"),
            process(api_cmd, env, f"{api}/healthz"),
        ):
            paths = Paths(
                direct=openai.OpenAI(base_url=f"{upstream}/v1", api_key="x", max_retries=0),
                gateway=openai.OpenAI(base_url=f"{api}/v1", api_key=key, max_retries=0),
                direct_async=openai.AsyncOpenAI(
                    base_url=f"{upstream}/v1", api_key="x", max_retries=0
                ),
                gateway_async=openai.AsyncOpenAI(base_url=f"{api}/v1", api_key=key, max_retries=0),
            )
            limits = "in-process" if args.no_redis else "Redis"
            print(
                f"gateway bench: Postgres, {limits} limits; {args.rounds} interleaved rounds of "
                f"{args.calls} calls per path; medians of the round figures (ms)"
            )
            for label, measure in (
                ("first streamed token", first_token),
                ("whole non-streamed call", whole_call),
            ):
                r = interleaved(paths, measure, args.rounds, args.calls)
                added50 = r["gateway"]["p50"] - r["direct"]["p50"]
                added99 = r["gateway"]["p99"] - r["direct"]["p99"]
                direct, gateway = r["direct"], r["gateway"]
                print(
                    f"  {label:<24} direct p50 {direct['p50']:6.2f} p99 {direct['p99']:6.2f}"
                    f" | gateway p50 {gateway['p50']:6.2f} p99 {gateway['p99']:6.2f}"
                    f" | added p50 {added50:5.2f} p99 {added99:5.2f}"
                )
            results = {}
            for label, client in (("direct", paths.direct_async), ("gateway", paths.gateway_async)):
                results[label] = asyncio.run(throughput(client, args.concurrency, args.seconds))
            for label, (rps, p99) in results.items():
                where = f"concurrency {args.concurrency}: {label:<8}"
                print(f"  {where} {rps:7.0f} req/s   p99 {p99:7.1f} ms")
            ratio = results["gateway"][0] / results["direct"][0]
            print(f"  gateway/direct throughput ratio {ratio:.2f}")
            print("  goal: added at most 3 ms at p50 and 10 ms at p99 (concurrency 1)")
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    if "--serve-api" in sys.argv:
        serve_api()
    else:
        sys.exit(main())
