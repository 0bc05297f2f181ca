#!/usr/bin/env python3
"""Gateway overhead: the official openai client calling the fake upstream directly, through
the LiteLLM proxy (the peer), and through aicredits' /v1 API in production mode, in one run.

Everything is private to the run (tests/system/harness.py): a Postgres cluster and a Redis
on free ports, the fake upstream (no artificial delay), and the app the way production runs
it, `python -m aicredits prod --backend-only --workers 1` (Granian, Postgres, Redis limits,
API key, reserve, settle). The peer is the LiteLLM proxy with one worker and no database (so
no metering at all), installed from PyPI into its own throwaway venv under `.bench/`, never
into the project's; when that install fails the bench says so and runs without it.

Measured at the client, in interleaved rounds after a warm-up, so a neighbour's load falls on
every path alike: each round starts with the next path in turn, and each path's calls start
after a short quiet (QUIET_SECONDS), so one server's leftover work is not charged to the path
measured after it. Each figure is the median of the round figures. Then requests per second
at a fixed concurrency for each path, and `verify-ledger` on the database afterwards.

    python bench/gateway.py [--rounds 7] [--calls 40] [--seconds 5] [--concurrency 32]
                            [--no-peer] [--workers 1] [--against REV]

--against REV adds a path: the app as it was at git revision REV (checked out into a
worktree under .bench/, run with this venv, on its own database), measured in the same
interleaved rounds. On a noisy machine that is the way to tell what a change did: two runs
minutes apart differ by more than most changes do.

Prints numbers; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.system.harness as harness  # noqa: E402
from aicredits.adapters.db import Database  # noqa: E402
from aicredits.services.verify import verify_ledger  # noqa: E402
from tests.system.harness import (  # noqa: E402
    MODEL,
    Services,
    app_env,
    free_port,
    private_services,
    provision,
    running_app,
    stop_process,
    wait_until,
)

MESSAGES: Any = [{"role": "user", "content": "Say something short."}]
WORK = ROOT / ".bench"
PEER_VENV = WORK / "litellm-venv"
PEER_PACKAGE = "litellm[proxy]"
PEER_MASTER_KEY = "sk-bench-" + uuid.uuid4().hex
QUIET_SECONDS = 0.3  # before each path's calls in a round
USERS = 8  # the throughput run spreads its calls over these, so no single account is hot


# --- the peer: LiteLLM's proxy in its own venv ----------------------------------------------


def peer_python() -> Path | None:
    """The throwaway venv's python with LiteLLM's proxy in it, installing it (from PyPI,
    through pip) the first time. None, with the reason printed, if that fails."""
    python = PEER_VENV / "bin" / "python"
    litellm = PEER_VENV / "bin" / "litellm"
    if litellm.exists():
        return python
    WORK.mkdir(exist_ok=True)
    log = WORK / "litellm-install.log"
    print(f"  installing {PEER_PACKAGE} into {PEER_VENV.relative_to(ROOT)} (log: {log.name})")
    with log.open("w") as sink:
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(PEER_VENV)],
            [str(python), "-m", "pip", "install", "--quiet", PEER_PACKAGE],
        ]
        for step in steps:
            if subprocess.run(step, stdout=sink, stderr=subprocess.STDOUT).returncode != 0:
                print(f"  LiteLLM could not be installed ({' '.join(step[-2:])} failed); "
                      "running without the peer column")  # fmt: skip
                return None
    return python if litellm.exists() else None


def peer_version(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip() or "?"


@contextmanager
def running_peer(python: Path, upstream_v1: str, log: Path) -> Iterator[str]:
    """LiteLLM's proxy, one worker, no database, in front of the fake upstream."""
    port = free_port()
    config = log.with_suffix(".yaml")
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream_v1}\n"
        "      api_key: sk-fake-bench\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
    )
    # No DATABASE_URL or REDIS_URL: LiteLLM with no database keeps no spend and no keys.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    # Its clients authenticate with the master key (it refuses to start without one).
    env.update(
        LITELLM_MASTER_KEY=PEER_MASTER_KEY,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
        PYTHONUNBUFFERED="1",
    )
    command = [
        str(python.parent / "litellm"), "--config", str(config), "--host", "127.0.0.1",
        "--port", str(port), "--num_workers", "1",
    ]  # fmt: skip
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            command, cwd=WORK, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: proc.poll() is not None or _answers(f"{base}/health/liveliness"),
            timeout=180,
            interval=0.5,
            what="LiteLLM's proxy",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"LiteLLM exited early:\n{log.read_text()[-3000:]}")
        yield base
    finally:
        stop_process(proc)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.TransportError:
        return False


# --- an earlier revision of the app, for --against ----------------------------------------


@contextmanager
def revision_tree(rev: str) -> Iterator[tuple[Path, str]]:
    """A worktree of `rev` under .bench/, using this venv, and its short hash; the worktree
    is removed after the run, so `git worktree list` is left as it was."""
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    tree = WORK / f"rev-{sha[:12]}"
    if not (tree / "aicredits").exists():
        WORK.mkdir(exist_ok=True)
        subprocess.run(
            ["git", "worktree", "add", "--force", "--detach", str(tree), sha],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
    venv = tree / ".venv"
    if not venv.exists():
        venv.symlink_to(ROOT / ".venv")
    try:
        yield tree, sha[:9]
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True
        )


@contextmanager
def app_from(tree: Path) -> Iterator[None]:
    """The harness starts (and provisions) the app of `tree` instead of this checkout's."""
    root, harness.ROOT = harness.ROOT, tree
    try:
        yield
    finally:
        harness.ROOT = root


# --- measuring --------------------------------------------------------------------------------


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
    paths: dict[str, openai.OpenAI],
    measure: Callable[[openai.OpenAI], float],
    rounds: int,
    calls: int,
) -> dict[str, dict[str, float]]:
    for client in paths.values():  # warm-up: connections, prepared statements, caches
        for _ in range(10):
            measure(client)
    per_round: dict[str, dict[str, list[float]]] = {name: {"p50": [], "p99": []} for name in paths}
    names = list(paths)
    for n in range(rounds):
        # Each round starts with another path, and each path's calls start on a quiet
        # machine: a server's work left over after its last reply (LiteLLM's logging
        # callbacks, our spend notes) is not charged to the path measured after it.
        for name in names[n % len(names) :] + names[: n % len(names)]:
            client = paths[name]
            time.sleep(QUIET_SECONDS)
            samples = [measure(client) * 1000 for _ in range(calls)]
            per_round[name]["p50"].append(pct(samples, 0.5))
            per_round[name]["p99"].append(pct(samples, 0.99))
    return {
        name: {stat: statistics.median(values) for stat, values in stats.items()}
        for name, stats in per_round.items()
    }


async def throughput(
    clients: list[openai.AsyncOpenAI], concurrency: int, seconds: float
) -> tuple[float, float, int]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        nonlocal errors
        client = clients[n % len(clients)]
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            except openai.APIError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - began
    for client in clients:  # in this event loop, which closes after the run
        await client.close()
    return len(latencies) / elapsed, pct(latencies, 0.99) * 1000, errors


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.node()}, {os.cpu_count()} cores, {platform.machine()}; load {load}"


# --- the run ----------------------------------------------------------------------------------


def bench_env(services: Services, database_url: str, args: argparse.Namespace) -> dict[str, str]:
    return app_env(
        services,
        database_url,
        # Production's timings, not the system tests' short ones.
        HOLD_LEASE_SECONDS="30",
        STREAM_CHECKPOINT_SECONDS="2",
        HOLD_SWEEP_INTERVAL_SECONDS="5",
        JOBS_INTERVAL_SECONDS="60",
        UPSTREAM_MAX_SECONDS="300",
        UPSTREAM_RETRIES="2",
        RATE_LIMIT_USER_PER_MINUTE="10000000",
        RATE_LIMIT_IP_PER_MINUTE="10000000",
        RATE_LIMIT_CONCURRENT=str(max(64, args.concurrency)),
    )


@contextmanager
def running_revision(
    rev: str, services: Services, args: argparse.Namespace
) -> Iterator[tuple[str, str, list[str], str]]:
    """The app at `rev`, on its own database: (path name, /v1 URL, API keys, database URL)."""
    database_url = services.postgres.create_database(f"gw_rev_{uuid.uuid4().hex[:6]}")
    env = bench_env(services, database_url, args)
    with revision_tree(rev) as (tree, short), app_from(tree):
        app = running_app(env, workers=args.workers, log=services.base / f"app-{short}.log")
        with app as running:
            keys = [a.api_key for a in provision(env, [10**12] * USERS, label="gw")]
            harness.ROOT = ROOT  # started: the rest of the run is this checkout's
            yield f"@{short}", f"{running.base_url}/v1", keys, database_url


def run(args: argparse.Namespace, services: Services, peer: Path | None) -> int:
    database_url = services.postgres.create_database(f"gw_{uuid.uuid4().hex[:6]}")
    env = bench_env(services, database_url, args)
    upstream_v1 = f"{services.upstream_url}/v1"
    with (
        running_app(env, workers=args.workers, log=services.base / "app.log") as app,
        contextmanager_or_none(
            running_revision(args.against, services, args) if args.against else None
        ) as earlier,
    ):
        keys = [a.api_key for a in provision(env, [10**12] * USERS, label="gw")]
        with contextmanager_or_none(
            running_peer(peer, upstream_v1, services.base / "litellm.log") if peer else None
        ) as peer_url:
            urls = {"direct": (upstream_v1, ["sk-fake"])}
            if peer_url:
                urls["litellm"] = (f"{peer_url}/v1", [PEER_MASTER_KEY])
            urls["aicredits"] = (f"{app.base_url}/v1", keys)
            if earlier:
                urls[earlier[0]] = (earlier[1], earlier[2])
            sync = {
                name: openai.OpenAI(base_url=url, api_key=k[0], max_retries=0)
                for name, (url, k) in urls.items()
            }
            peer_note = f"LiteLLM {peer_version(peer)}" if peer and peer_url else "no peer"
            print(
                f"gateway bench {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}\n"
                f"  aicredits: prod --backend-only, {args.workers} worker(s), Postgres, Redis "
                f"limits; peer: {peer_note}, 1 worker, no database\n"
                f"  {args.rounds} interleaved rounds of {args.calls} calls per path, after a "
                "warm-up; medians of the round figures (ms)\n"
            )
            header = f"  {'':<24} {'path':<10} {'p50':>7} {'p99':>7} {'added p50':>10} " \
                     f"{'added p99':>10}"  # fmt: skip
            print(header)
            for label, measure in (
                ("first streamed token", first_token),
                ("whole non-streamed call", whole_call),
            ):
                r = interleaved(sync, measure, args.rounds, args.calls)
                for name, stats in r.items():
                    added = ""
                    if name != "direct":
                        a50 = stats["p50"] - r["direct"]["p50"]
                        a99 = stats["p99"] - r["direct"]["p99"]
                        added = f"{a50:+10.2f} {a99:+10.2f}"
                    print(f"  {label:<24} {name:<10} {stats['p50']:7.2f} {stats['p99']:7.2f} "
                          f"{added}")  # fmt: skip
                    label = ""
                if "litellm" in r:
                    ours = {s: r["aicredits"][s] - r["direct"][s] for s in ("p50", "p99")}
                    theirs = {s: r["litellm"][s] - r["direct"][s] for s in ("p50", "p99")}
                    ratio = "  ".join(
                        f"{s} {ours[s] / theirs[s]:.2f}" if theirs[s] > 0 else f"{s} -"
                        for s in ("p50", "p99")
                    )
                    print(f"  {'':<24} aicredits added / LiteLLM added: {ratio}")
                if earlier:
                    was = earlier[0]
                    change = "  ".join(
                        f"{s} {r['aicredits'][s] - r[was][s]:+.2f} ms" for s in ("p50", "p99")
                    )
                    print(f"  {'':<24} aicredits against {was}: {change}")
            print()
            for name, (url, k) in urls.items():
                clients = [
                    openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0) for key in k
                ]
                rps, p99, errors = asyncio.run(throughput(clients, args.concurrency, args.seconds))
                print(f"  concurrency {args.concurrency}: {name:<10} {rps:7.0f} req/s   "
                      f"p99 {p99:7.1f} ms   errors {errors}")  # fmt: skip
    problems = []
    for url in [database_url] + ([earlier[3]] if earlier else []):
        db = Database(url)
        problems += verify_ledger(db)
        db.dispose()
    print(f"  verify-ledger after the run: {'clean' if not problems else problems[0]}")
    return 0 if not problems else 1


@contextmanager
def contextmanager_or_none(cm: Any) -> Iterator[Any]:
    if cm is None:
        yield None
    else:
        with cm as value:
            yield value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=40, help="calls per path per round")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="aicredits' worker processes")
    parser.add_argument("--no-peer", action="store_true", help="skip LiteLLM")
    parser.add_argument(
        "--against", metavar="REV", help="also run the app of this git revision, interleaved"
    )
    args = parser.parse_args()
    peer = None if args.no_peer else peer_python()
    if shutil.which("pg_ctl") is None and not Path("/usr/lib/postgresql").exists():
        print("Postgres binaries not found (the harness starts a private cluster)")
        return 1
    with private_services() as services:
        return run(args, services, peer)


if __name__ == "__main__":
    raise SystemExit(main())
