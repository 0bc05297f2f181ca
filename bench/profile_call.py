#!/usr/bin/env python3
"""Where one metered call's time goes: a profile of the production worker, and the round
trips each call makes to Postgres and Redis.

Starts the same private services and app as bench/gateway.py (`prod --backend-only`, one
worker), then sends calls one after another (half streamed, half not) while
  * py-spy (from PyPI, in its own throwaway venv under .bench/) samples the worker, and
  * Postgres logs every statement and Redis counts every command,
and prints the functions the worker spent most time in and the statements and commands per
call. Needs root or ptrace rights for py-spy; without py-spy it still counts round trips.

    python bench/profile_call.py [--calls 400] [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.system.harness import (  # noqa: E402
    MODEL,
    app_env,
    private_services,
    provision,
    running_app,
)

MESSAGES: Any = [{"role": "user", "content": "Say something short."}]  # as bench/gateway.py
WORK = ROOT / ".bench"
TOOLS_VENV = WORK / "tools-venv"


def py_spy() -> Path | None:
    exe = TOOLS_VENV / "bin" / "py-spy"
    if exe.exists():
        return exe
    WORK.mkdir(exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(TOOLS_VENV)],
        [str(TOOLS_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "py-spy"],
    ]
    for step in steps:
        if subprocess.run(step, capture_output=True).returncode != 0:
            print("  py-spy could not be installed: counting round trips only")
            return None
    return exe if exe.exists() else None


def redis_calls(client: object) -> dict[str, int]:
    stats = client.info("commandstats")  # type: ignore[attr-defined]
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def statement_kind(line: str) -> str:
    text = line.split("statement: ", 1)[-1].split(": ", 1)[-1].strip()
    text = re.sub(r"\s+", " ", text)
    return text[:90]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    spy = py_spy()
    with private_services() as services:
        database_url = services.postgres.create_database(f"prof_{uuid.uuid4().hex[:6]}")
        env = app_env(
            services, database_url, HOLD_LEASE_SECONDS="30", STREAM_CHECKPOINT_SECONDS="2",
            HOLD_SWEEP_INTERVAL_SECONDS="5", JOBS_INTERVAL_SECONDS="60",
            UPSTREAM_MAX_SECONDS="300", RATE_LIMIT_USER_PER_MINUTE="10000000",
            RATE_LIMIT_IP_PER_MINUTE="10000000", RATE_LIMIT_CONCURRENT="64",
        )  # fmt: skip
        with running_app(env, workers=1, log=services.base / "app.log") as app:
            key = provision(env, [10**12], label="prof")[0].api_key
            client = openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=key, max_retries=0)
            for n in range(20):  # warm-up
                client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=n % 2 == 1)
            admin = services.postgres.url().replace("+psycopg", "")
            with psycopg.connect(admin, autocommit=True) as pg:
                pg.execute("ALTER SYSTEM SET log_statement = 'all'")
                pg.execute("SELECT pg_reload_conf()")
            time.sleep(1)
            pg_log = services.postgres.log
            log_start = pg_log.stat().st_size
            cache = services.redis.client()
            before = redis_calls(cache)
            worker = app.worker_pids()[-1]
            out = WORK / "profile.txt"
            spying = None
            if spy is not None:
                spying = subprocess.Popen(
                    [str(spy), "record", "-p", str(worker), "-r", "200", "-f", "raw",
                     "-o", str(out), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(1)
            began = time.perf_counter()
            for n in range(args.calls):
                if n % 2:
                    for _ in client.chat.completions.create(
                        model=MODEL, messages=MESSAGES, stream=True
                    ):
                        pass
                else:
                    client.chat.completions.create(model=MODEL, messages=MESSAGES)
            elapsed = time.perf_counter() - began
            after = redis_calls(cache)
            time.sleep(0.5)
            with psycopg.connect(admin, autocommit=True) as pg:
                pg.execute("ALTER SYSTEM RESET log_statement")
                pg.execute("SELECT pg_reload_conf()")
            if spying is not None:
                spying.send_signal(2)  # SIGINT: py-spy writes what it has
                spying.wait(timeout=30)
        with pg_log.open(errors="replace") as f:
            f.seek(log_start)
            lines = [ln for ln in f if "statement: " in ln or "execute " in ln]
    print(f"{args.calls} calls (half streamed) one after another in {elapsed:.1f} s\n")
    print(f"Postgres statements per call: {len(lines) / args.calls:.2f}")
    kinds = collections.Counter(statement_kind(ln) for ln in lines)
    for text, count in kinds.most_common(12):
        print(f"  {count / args.calls:5.2f}  {text}")
    print("\nRedis commands per call:")
    for name in sorted(after):
        delta = after[name] - before.get(name, 0)
        if delta and name not in ("info",):
            print(f"  {delta / args.calls:5.2f}  {name}")
    if spy is not None and out.exists():
        print_profile(out, args.top)
    return 0


IDLE = {"EpollSelector.select", "_worker", "Connection.wait", "Condition.wait", "wait", ""}


def print_profile(raw: Path, top: int) -> None:
    """Own time and inclusive time per function, from py-spy's collapsed stacks, for the
    worker's threads together (the event loop and the database threads)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")]  # fmt: skip
        if frames[-1].split(" (")[0] in IDLE:  # waiting, not working
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    print(f"\npy-spy, {samples} busy samples of the worker (all threads), top by inclusive:")
    common = max(total.values(), default=0)  # the worker's own start-up frames
    ranked = [(f, c) for f, c in total.most_common() if c < common][:top]
    for frame, count in ranked:
        print(f"  {100 * count / samples:5.1f}%  own {100 * own[frame] / samples:5.1f}%  {frame}")
    print("\ntop by own time:")
    for frame, count in own.most_common(top // 2):
        print(f"  {100 * count / samples:5.1f}%  {frame}")


if __name__ == "__main__":
    raise SystemExit(main())
