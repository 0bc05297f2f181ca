"""Fifty seeded crashes in the middle of metered calls. Each call is SIGKILLed with its API
worker process at a seeded moment after the call was sent: before the upstream answers,
mid-stream, near the end. Five calls share a worker, as calls do in production: each is sent
so that the one kill lands at its own seeded moment (the call to die 4 s in is sent 4 s before
the kill, the one to die at 0.1 s, 0.1 s before), which keeps the fifty seeded moments and
starts ten processes instead of fifty. Then the sweeper settles what the dead workers left.
Every killed call must be charged at most what its client received, and at least that minus
one checkpoint's worth of tokens; nothing stays held; verify-ledger stays clean.

The model costs one credit per output token and nothing for the prompt (harness.MODELS), so
a charge is a token count. Leases and checkpoints are shortened so the runs take seconds.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import credit_accounts, holds, usage_events, utcnow
from aicredits.services import recovery
from tests.system.conftest import assert_ledger_sound
from tests.system.harness import (
    MODEL,
    ROOT,
    Services,
    app_env,
    free_port,
    provision,
    stop_process,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUNS = 50
CALLS_PER_WORKER = 5
LANES = 4  # workers at a time
SEED = 20261130
TOKENS_PER_SECOND = 10
CHECKPOINT_SECONDS = 0.5
LEASE_SECONDS = 2.0
PACE = f"[fake tokens-per-second={TOKENS_PER_SECOND}]"
# A checkpoint's worth of tokens, and one more for a token on the wire when it was taken.
ONE_CHECKPOINT = int(TOKENS_PER_SECOND * CHECKPOINT_SECONDS) + 1


@dataclass
class Run:
    index: int
    stream: bool
    kill_after: float  # seconds after the request was sent
    received: int = 0  # reply tokens the client got before the connection died
    error: str = ""  # anything but the connection dying, raised in the call's thread
    user_id: int = 0


def start_worker(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.system.api_worker", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def up() -> bool:
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        return proc.poll() is not None

    wait_until(up, timeout=60, interval=0.1, what="the API worker")
    assert proc.poll() is None, log_path.read_text()[-2000:]
    return proc


def one_call(run: Run, port: int, api_key: str) -> None:
    """Runs in a timer's thread, where an exception would only be printed: it is kept."""
    try:
        _call(run, port, api_key)
    except Exception as exc:
        run.error = repr(exc)


def _call(run: Run, port: int, api_key: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {
        "model": MODEL,
        "stream": run.stream,
        "messages": [{"role": "user", "content": f"run {run.index} {PACE}"}],
    }
    with contextlib.suppress(OSError, http.client.HTTPException):
        conn.request(
            "POST", "/v1/chat/completions", body=json.dumps(body),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        )  # fmt: skip
        response = conn.getresponse()
        if response.status == 200 and run.stream:
            while line := response.readline():
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    run.received += sum(
                        1 for c in event.get("choices", []) if c.get("delta", {}).get("content")
                    )
        elif response.status == 200:
            run.received = json.loads(response.read())["usage"]["completion_tokens"]
    conn.close()


def one_worker(runs: list[Run], env: dict[str, str], keys: list[str], base: Path) -> list[Run]:
    """Sends each call `kill_after` before the worker's one kill."""
    port = free_port()
    proc = start_worker(env, port, base / f"kill-run-{runs[0].index}.log")
    try:
        kill_at = max(run.kill_after for run in runs)
        timers = [
            threading.Timer(kill_at - run.kill_after, one_call, (run, port, key))
            for run, key in zip(runs, keys, strict=True)
        ]
        killer = threading.Timer(kill_at, lambda: os.kill(proc.pid, signal.SIGKILL))
        for timer in [*timers, killer]:
            timer.start()
        for timer in [killer, *timers]:
            timer.join()
    finally:
        stop_process(proc)
    return runs


def test_fifty_seeded_worker_crashes_charge_at_most_what_was_delivered(services: Services) -> None:
    url = services.postgres.create_database(f"kill_runs_{SEED}")
    env = app_env(
        services,
        url,
        HOLD_LEASE_SECONDS=str(LEASE_SECONDS),
        STREAM_CHECKPOINT_SECONDS=str(CHECKPOINT_SECONDS),
        UPSTREAM_MAX_SECONDS="60",
    )
    subprocess.run(
        [sys.executable, "-m", "aicredits", "migrate"],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    accounts = provision(env, [1_000] * RUNS, label="kill-runs")
    rng = random.Random(SEED)
    # A reply takes 4 s (40 tokens at 10 a second); a kill lands anywhere from before the
    # upstream's first byte to after the end.
    runs = [
        Run(i, stream=rng.random() < 0.8, kill_after=rng.uniform(0.05, 4.5)) for i in range(RUNS)
    ]
    for run, account in zip(runs, accounts, strict=True):
        run.user_id = account.user_id
    groups = [runs[i : i + CALLS_PER_WORKER] for i in range(0, RUNS, CALLS_PER_WORKER)]
    started = time.monotonic()
    with ThreadPoolExecutor(LANES) as pool:
        list(
            pool.map(
                lambda group: one_worker(
                    group, env, [accounts[r.index].api_key for r in group], services.base
                ),
                groups,
            )
        )
    done = runs
    elapsed = time.monotonic() - started

    assert [r for r in runs if r.error] == []
    db = Database(url)
    try:
        # The sweeper's run, once the dead workers' leases have lapsed.
        time.sleep(LEASE_SECONDS + 0.5)
        recovery.recover(db, lease=timedelta(seconds=LEASE_SECONDS), now=utcnow())
        with db.read() as conn:
            by_user = {row.user_id: row for row in conn.execute(sa.select(holds))}
            events = {row.request_id: row for row in conn.execute(sa.select(usage_events))}
            balances = dict(
                conn.execute(sa.select(credit_accounts.c.user_id, credit_accounts.c.balance)).all()
            )
        reached = [r for r in done if r.user_id in by_user]
        assert len(reached) >= RUNS // 2, "most kills should land after the hold was made"
        for run in done:
            hold = by_user.get(run.user_id)
            if hold is None:  # killed before it reserved anything
                assert balances[run.user_id] == 1_000, run
                continue
            charged = hold.charged or 0
            assert hold.status != "pending", run
            # Never more than the client got; at most one checkpoint less.
            assert charged <= run.received, (run, hold)
            assert charged >= run.received - ONE_CHECKPOINT, (run, hold)
            assert balances[run.user_id] == 1_000 - charged, run
            if hold.status == "settled":
                assert events[hold.request_id].charged == charged
        assert_ledger_sound(db)
    finally:
        db.dispose()
    print(f"{RUNS} kill runs in {elapsed:.0f} s; {len(reached)} reached a hold")
