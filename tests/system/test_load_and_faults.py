"""Load across workers, and an upstream that fails under it: every credit accounted for.

The model costs exactly 40 credits per completed call and 1 credit per delivered token (see
harness.MODELS), so what each user may do and what each call must cost is known exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from aicredits.adapters.db import Database
from tests.system.clients import CallResult, ChatClient, api_call
from tests.system.conftest import (
    accounts,
    assert_ledger_sound,
    holds_by_request,
    pending_holds,
    usage_by_request,
)
from tests.system.harness import CALL_COST, REPLY_TOKENS, RunningApp, provision, wait_until

USERS = 50
CALLS_PER_USER = 20  # 50 x 20 = 1,000 calls


def kind_of(j: int) -> str:
    """A user's calls mix the three ways in: API, streamed API, and the chat page."""
    return ("api", "stream", "api", "chat")[j % 4]


def one_call(
    app: RunningApp, http: httpx.Client, chat: ChatClient, key: str, kind: str, prompt: str
) -> CallResult:
    if kind == "chat":
        return chat.send(prompt)
    return api_call(http, app.base_url, key, prompt, stream=kind == "stream")


@dataclass
class UserRun:
    user_id: int
    results: list[tuple[str, CallResult]]  # (prompt marker, result)


def drive(
    app: RunningApp,
    session: str,
    key: str,
    user_id: int,
    prompts: list[str],
) -> UserRun:
    """One user's calls, one after another (a person, or a script, waits for each reply)."""
    results = []
    with httpx.Client(timeout=60) as http, ChatClient(app.base_url, session) as chat:
        for j, prompt in enumerate(prompts):
            results.append((prompt, one_call(app, http, chat, key, kind_of(j), prompt)))
    return UserRun(user_id, results)


def run_all(jobs: list[Callable[[], UserRun]]) -> list[UserRun]:
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: job(), jobs))


def sweep_done(db: Database, timeout: float = 20) -> None:
    """Wait for the in-app sweeper to release any hold left by a call that never settled."""
    wait_until(lambda: pending_holds(db) == 0, timeout=timeout, what="no pending holds")


@pytest.mark.timeout(240)
def test_a_thousand_calls_spend_exactly_what_the_balances_allow(
    system_app: RunningApp, app_db: Database
) -> None:
    allowed = [8 + (i % 17) for i in range(USERS)]  # 8..24 calls' worth, so many run dry
    users = provision(system_app.env, [n * CALL_COST for n in allowed], label="load")
    prompts = [f"question {j}" for j in range(CALLS_PER_USER)]
    runs = run_all(
        [
            lambda u=u: drive(system_app, u.session, u.api_key, u.user_id, prompts)  # type: ignore[misc]
            for u in users
        ]
    )

    assert sum(len(r.results) for r in runs) == USERS * CALLS_PER_USER
    successes = 0
    for user, may, run in zip(users, allowed, runs, strict=True):
        results = [result for _, result in run.results]
        ok = [r for r in results if r.ok]
        refused = [r for r in results if not r.ok]
        # Every refusal is "not enough credits", nothing else (no 5xx, no cut, no 429).
        assert all(r.error_code in ("insufficient_credits", "credits") for r in refused), refused
        assert len(ok) == min(may, CALLS_PER_USER), (user.user_id, results)
        assert all(r.tokens == REPLY_TOKENS for r in ok)
        assert all(r.charged in (None, CALL_COST) for r in ok)
        successes += len(ok)
    assert successes == sum(min(n, CALLS_PER_USER) for n in allowed)

    sweep_done(app_db)
    balances = accounts(app_db, [u.user_id for u in users])
    for user, may in zip(users, allowed, strict=True):
        spent = user.credits - balances[user.user_id].balance
        assert spent == CALL_COST * min(may, CALLS_PER_USER) <= user.credits
        assert balances[user.user_id].held == 0
    # Each successful API call has exactly one usage event, charged the full price.
    api_ok = [r.request_id for run in runs for _, r in run.results if r.ok and r.request_id]
    assert api_ok and all(api_ok)
    usage = usage_by_request(app_db, [rid for rid in api_ok if rid])
    assert all(len(events) == 1 and events[0].charged == CALL_COST for events in usage.values())
    # ... and so does every chat reply: the totals agree too.
    assert_ledger_sound(app_db)


def fault_for(i: int) -> tuple[str, int | None]:
    """Every tenth call fails outright, every tenth (offset) is cut after n tokens."""
    if i % 10 == 3:
        return "[fake fault=500]", None
    if i % 10 == 7:
        n = 1 + (i * 7) % (REPLY_TOKENS - 1)
        return f"[fake fault=cut:{n}]", n
    return "", None


@pytest.mark.timeout(240)
def test_upstream_failures_and_cuts_under_load_charge_only_what_was_delivered(
    system_app: RunningApp, app_db: Database
) -> None:
    n_users, calls = 20, 20
    users = provision(system_app.env, [10_000] * n_users, label="faults")
    plans = []
    for u_index in range(n_users):
        plans.append([fault_for(u_index * calls + j) for j in range(calls)])
    runs = run_all(
        [
            lambda u=u, plan=plan: drive(  # type: ignore[misc]
                system_app,
                u.session,
                u.api_key,
                u.user_id,
                [f"question {j} {marker}" for j, (marker, _) in enumerate(plan)],
            )
            for u, plan in zip(users, plans, strict=True)
        ]
    )
    sweep_done(app_db)
    balances = accounts(app_db, [u.user_id for u in users])
    failed_ids, cut_ids, ok_ids = [], {}, []
    for user, plan, run in zip(users, plans, runs, strict=True):
        expected_spend = 0
        for j, ((marker, cut_at), (_, result)) in enumerate(zip(plan, run.results, strict=True)):
            kind = kind_of(j)
            if marker == "[fake fault=500]":
                # The model failed before any output: an error, nothing charged.
                assert result.status in (0, 502) and not result.ok, result
                assert result.error_code in ("upstream_failed", "upstream"), result
                failed_ids.append(result.request_id)
            elif cut_at is not None and kind in ("stream", "chat"):
                # Broken off mid-reply: the part delivered is paid for, nothing else.
                assert result.cut and result.tokens == cut_at, (marker, result)
                expected_spend += cut_at
                if result.request_id:
                    cut_ids[result.request_id] = cut_at
            elif cut_at is not None:
                # A non-streamed reply that breaks off delivered nothing and costs nothing.
                assert result.status == 502 and result.error_code == "upstream_failed", result
                failed_ids.append(result.request_id)
            else:
                assert result.ok, (marker, result, system_app.log_about(result.request_id))
                expected_spend += CALL_COST
                ok_ids.append(result.request_id)
        assert user.credits - balances[user.user_id].balance == expected_spend, user.user_id
        assert balances[user.user_id].held == 0

    api_failed = [rid for rid in failed_ids if rid]
    assert len(api_failed) >= 0.08 * n_users * calls * 0.5  # the faults did happen, in numbers
    failed_holds = holds_by_request(app_db, api_failed)
    assert {h.status for h in failed_holds.values()} == {"released"}
    assert all(not events for events in usage_by_request(app_db, api_failed).values())
    assert cut_ids
    usage = usage_by_request(app_db, list(cut_ids))
    for request_id, delivered in cut_ids.items():
        (event,) = usage[request_id]
        assert (event.charged, event.output_tokens, event.estimated) == (delivered, delivered, True)
    assert_ledger_sound(app_db)
