#!/usr/bin/env python3
"""A soak of the chat: many signed-in sessions streaming replies at once for a few minutes,
against the app's backend with Reflex's Redis state manager.

Each session is one user with their own session cookie (made on the server, as a sign-in
would) and their own socket.io websocket, sending ChatState's events the way the page does:
`load`, then `send` again and again (a new conversation every few turns), each as soon as the
previous reply has finished and a short pause has passed. The fake upstream streams every
reply at a steady pace, so the streams overlap. python-socketio's sync client runs one set of
threads per session (its asyncio client needs aiohttp, which is not installed).

Printed at the end: replies finished, errors the clients saw (by kind) and unanswered sends;
lock-expiry and lock-held-too-long lines in the app's log; the event p50/p95 (from the emit to
the first delta carrying reply text, and to the final delta); the serialized state per session
as stored in Redis (the largest seen during the run, per session); verify-ledger; and whether
the balance each client was last shown equals what the ledger says.

    python bench/chat_soak.py [--sessions 100] [--seconds 120] [--reflex-env prod|dev]
                              [--workers 2] [--tokens-per-second 40] [--reply-tokens 60]
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import socketio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chat_ui import REDIS_URL, bench_database, fake_upstream, running_app  # noqa: E402

from aicredits.adapters.db import Database  # noqa: E402
from aicredits.services import (  # noqa: E402
    auth,
    cookies,
    ledger,
    users,
)
from aicredits.services.verify import verify_ledger  # noqa: E402
from aicredits.settings import get_settings  # noqa: E402
from aicredits.state.chat import ChatState  # noqa: E402
from tests.e2e.conftest import RunningApp  # noqa: E402

NAMESPACE = "/_event"
CHAT = ChatState.get_full_name()
SESSION_STATE_PREFIX = "reflex___state____state"
REPLY_TIMEOUT = 120.0
STATE_SAMPLE_SECONDS = 10.0
GOAL_STATE_BYTES = 100 * 1024
PROMPTS = ("Tell me something.", "And then?", "Go on, briefly.", "Why is that?")


def _var(update: dict[str, Any], name: str) -> list[Any]:
    """Every value of the state var `name` in one update from the backend."""
    suffix = f"{name}_rx_state_"
    return [
        value
        for substate in update.get("delta", {}).values()
        for var, value in substate.items()
        if var == suffix
    ]


@dataclass
class Turn:
    emitted: float
    first_delta: float | None = None
    first_text: float | None = None
    done: float | None = None
    error: str = ""


@dataclass
class Session:
    """One user's websocket, the updates it receives and the turns it has timed."""

    email: str
    user_id: int
    cookie: str
    token: str = field(default_factory=lambda: str(uuid.uuid4()))
    turns: list[Turn] = field(default_factory=list)
    current: Turn | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    loaded: threading.Event = field(default_factory=threading.Event)
    shown_balance: int | None = None
    client_errors: Counter[str] = field(default_factory=Counter)
    event_names: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0
    streaming_seen: bool = False

    def receive(self, update: dict[str, Any]) -> None:
        now = time.perf_counter()
        for event in update.get("events", []):
            self.event_names[str(event.get("name"))] += 1
        for balance in _var(update, "available_credits"):
            self.shown_balance = int(balance)
        if _var(update, "models"):
            self.loaded.set()
        turn = self.current
        if turn is None:
            return
        if turn.first_delta is None and update.get("delta"):
            turn.first_delta = now
        for error in _var(update, "error"):
            if error:
                turn.error = str(error)
        for messages in _var(update, "messages"):
            if (
                turn.first_text is None
                and messages
                and messages[-1].get("role") == "assistant"
                and messages[-1].get("content")
            ):
                turn.first_text = now
        for streaming in _var(update, "streaming"):
            if streaming:
                self.streaming_seen = True
            elif self.streaming_seen or turn.error:
                turn.done = now
                self.streaming_seen = False
                self.finished.set()


def emit(client: socketio.Client, handler: str, payload: dict[str, Any] | None = None) -> None:
    client.emit(
        "event",
        {
            "name": f"{CHAT}.{handler}",
            "payload": payload or {},
            "router_data": {"pathname": "/chat", "asPath": "/chat", "query": {}},
        },
        namespace=NAMESPACE,
    )


def run_session(
    session: Session,
    app: RunningApp,
    stop_at: list[float],
    started: threading.Barrier,
    turns_per_conversation: int,
    pause: float,
) -> None:
    client = socketio.Client(websocket_extra_options={"origin": app.frontend})
    client.on("event", session.receive, namespace=NAMESPACE)
    client.connect(
        f"{app.backend}?token={session.token}",
        socketio_path="_event",
        namespaces=[NAMESPACE],
        transports=["websocket"],
        headers={"Cookie": session.cookie},
        wait_timeout=60,
    )
    try:
        emit(client, "load")
        if not session.loaded.wait(60):
            raise RuntimeError(f"{session.email}: the chat never loaded")
        started.wait()
        rng = random.Random(session.token)
        time.sleep(rng.uniform(0, 1.0))  # spread the first sends out
        in_conversation = 0
        while time.perf_counter() < stop_at[0]:
            if in_conversation >= turns_per_conversation:
                emit(client, "new_conversation")
                in_conversation = 0
                time.sleep(0.2)
            session.finished.clear()
            turn = Turn(emitted=time.perf_counter())
            session.current = turn
            message = rng.choice(PROMPTS)
            emit(client, "send", {"form_data": {"message": message}})
            if not session.finished.wait(REPLY_TIMEOUT):
                session.unanswered += 1
            session.turns.append(turn)
            session.current = None
            if turn.error:
                session.client_errors[turn.error.split(":")[0]] += 1
            in_conversation += 1
            time.sleep(rng.uniform(0.5, 1.5) * pause)
        # The last reply's balance update may trail its final delta by a moment.
        time.sleep(1.0)
    finally:
        client.disconnect()


def state_sizes(r: redis.Redis, tokens: set[str]) -> dict[str, int]:
    """Bytes of serialized state per client token: the sum of its substates' values
    (Reflex 0.10's StateManagerRedis stores `{token}_{state full name}`, one key each)."""
    sizes: dict[str, int] = dict.fromkeys(tokens, 0)
    for key in r.scan_iter(match="*_reflex___state____state*", count=1000):
        name = key.decode()
        token = name.split("_reflex___state____state", 1)[0]
        if token in sizes and not name.endswith(("_lock", "_lock_waiters")):
            length = r.strlen(key)
            assert isinstance(length, int)  # a synchronous client
            sizes[token] += length
    return sizes


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def make_sessions(database_url: str, count: int) -> list[Session]:
    db = Database(database_url)
    name = cookies.cookie_name(get_settings(), cookies.SESSION)
    made = []
    for i in range(count):
        email = f"soak{i:03d}@example.test"
        user = users.create_user(db, email=email, name=f"Soak {i}", email_verified=True)
        ledger.grant(db, user_id=user.id, credits=10**8, key=f"soak:{user.id}", reason="soak")
        token = auth.create_session(db, user_id=user.id, days=1)
        made.append(Session(email=email, user_id=user.id, cookie=f"{name}={token}"))
    db.dispose()
    return made


def run(args: argparse.Namespace, work: Path) -> int:
    r = redis.Redis.from_url(REDIS_URL)
    extra_env = {"REFLEX_USE_GRANIAN": "true", "GRANIAN_WORKERS": str(args.workers)}
    with (
        bench_database() as database_url,
        fake_upstream(
            tokens_per_second=args.tokens_per_second, reply_tokens=args.reply_tokens
        ) as upstream,
        running_app(
            work=work,
            database_url=database_url,
            idp="http://127.0.0.1:9",  # nobody signs in through a provider here
            upstream=upstream,
            reflex_env=args.reflex_env,
            redis_state=True,
            backend_only=True,
            extra_env=extra_env,
        ) as app,
    ):
        sessions = make_sessions(database_url, args.sessions)
        return soak(args, app, sessions, r, database_url)


def soak(
    args: argparse.Namespace,
    app: RunningApp,
    sessions: list[Session],
    r: redis.Redis,
    database_url: str,
) -> int:
    stop_at = [float("inf")]
    started = threading.Barrier(len(sessions) + 1)
    threads = [
        threading.Thread(
            target=run_session,
            args=(s, app, stop_at, started, args.turns_per_conversation, args.pause),
            daemon=True,
        )
        for s in sessions
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # connecting 100 websockets at once is its own benchmark
    started.wait(timeout=300)
    began = time.perf_counter()
    stop_at[0] = began + args.seconds
    tokens = {s.token for s in sessions}
    largest: dict[str, int] = dict.fromkeys(tokens, 0)
    while any(t.is_alive() for t in threads):
        for token, size in state_sizes(r, tokens).items():
            largest[token] = max(largest[token], size)
        for thread in threads:
            thread.join(timeout=STATE_SAMPLE_SECONDS / len(threads))
    elapsed = time.perf_counter() - began
    for token, size in state_sizes(r, tokens).items():
        largest[token] = max(largest[token], size)
    return report(args, app, sessions, largest, elapsed, database_url)


def report(
    args: argparse.Namespace,
    app: RunningApp,
    sessions: list[Session],
    largest: dict[str, int],
    elapsed: float,
    database_url: str,
) -> int:
    turns = [t for s in sessions for t in s.turns]
    replies = [t for t in turns if t.done is not None and not t.error]
    ack = [(t.first_delta - t.emitted) * 1000 for t in replies if t.first_delta is not None]
    first = [(t.first_text - t.emitted) * 1000 for t in replies if t.first_text is not None]
    final = [(t.done - t.emitted) * 1000 for t in replies if t.done is not None]
    errors = sum((s.client_errors for s in sessions), Counter[str]())
    names = sum((s.event_names for s in sessions), Counter[str]())
    # Reflex's console wraps long lines; join them back before counting.
    log = " ".join(app.log.read_text(errors="replace").lower().split())
    lock_expired = log.count("lock expired for token")
    held_too_long = log.count("was held too long")
    sizes = sorted(largest.values())
    print(
        f"chat soak: {len(sessions)} sessions for {elapsed:.0f} s, reflex run --env "
        f"{args.reflex_env} --backend-only ({args.workers} workers), Redis state manager, "
        f"Postgres; fake upstream {args.reply_tokens} tokens at {args.tokens_per_second:g}/s; "
        f"a new conversation every {args.turns_per_conversation} turns"
    )
    print(
        f"  sends {len(turns)}, replies finished {len(replies)} "
        f"({len(replies) / elapsed:.1f}/s), unanswered {sum(s.unanswered for s in sessions)}"
    )
    print(f"  errors shown to clients: {dict(errors) or 0}")
    print(f"  events sent to clients: {dict(names)}")
    print(f"  lock-expiry lines in the app log: {lock_expired}   held-too-long: {held_too_long}")
    if ack and first and final:
        print(
            f"  event: emit -> first delta      p50 {statistics.median(ack):7.1f} ms"
            f"   p95 {pct(ack, 0.95):7.1f} ms"
        )
        print(
            f"  event: emit -> first reply text  p50 {statistics.median(first):7.1f} ms"
            f"   p95 {pct(first, 0.95):7.1f} ms"
        )
        print(
            f"  event: emit -> final delta      p50 {statistics.median(final):7.1f} ms"
            f"   p95 {pct(final, 0.95):7.1f} ms"
        )
    print(
        f"  state per session in Redis (largest seen): median {statistics.median(sizes) / 1024:.1f}"
        f" KB, max {sizes[-1] / 1024:.1f} KB (goal under {GOAL_STATE_BYTES // 1024} KB: "
        f"{'met' if sizes[-1] < GOAL_STATE_BYTES else 'MISSED'})"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"  machine: {os.cpu_count()} cores, load average now {load} (other work shares it)")
    db = Database(database_url)
    problems = verify_ledger(db)
    print(f"  verify-ledger: {'clean' if not problems else problems[:5]}")
    mismatched = []
    for s in sessions:
        available = ledger.get_balance(db, user_id=s.user_id).available
        if s.shown_balance != available:
            mismatched.append((s.email, s.shown_balance, available))
    db.dispose()
    print(
        f"  balance last shown to each client == the ledger's available: "
        f"{len(sessions) - len(mismatched)}/{len(sessions)}"
        + (f"; first mismatches {mismatched[:3]}" if mismatched else "")
    )
    ok = not problems and not mismatched and not lock_expired
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--reflex-env", choices=["dev", "prod"], default="prod")
    parser.add_argument("--workers", type=int, default=2, help="backend workers (prod)")
    parser.add_argument("--tokens-per-second", type=float, default=40.0)
    parser.add_argument("--reply-tokens", type=int, default=60)
    parser.add_argument("--turns-per-conversation", type=int, default=10)
    parser.add_argument("--pause", type=float, default=1.0, help="mean seconds between turns")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (app log)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # The sessions are made here and checked by the app: both must hash with one secret.
    os.environ.setdefault("SESSION_SECRET", secrets.token_hex(32))
    get_settings.cache_clear()
    work = Path(tempfile.mkdtemp(prefix="aicredits-bench-soak-"))
    try:
        return run(args, work)
    finally:
        if args.keep:
            print(f"  app log: {work / 'reflex.log'}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
