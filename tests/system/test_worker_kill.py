"""A worker is killed (SIGKILL) in the middle of a streamed reply: the client sees the cut,
the other workers keep serving, and within the hold's lease plus one sweep the sweeper
settles the dead call for what its worker had recorded delivering: never more than the
client received, at most one checkpoint less. Before leases, the credits stayed held for
10 minutes and the call was never paid for."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time

import httpx
import pytest

from aicredits.adapters.db import Database
from tests.system.clients import api_call
from tests.system.conftest import accounts, assert_ledger_sound, holds_by_request, usage_by_request
from tests.system.harness import CALL_COST, MODEL, RunningApp, provision, wait_until

WORKERS = 2
TOKENS_PER_SECOND = 4


@pytest.mark.timeout(180)
def test_a_killed_worker_s_call_is_paid_for_its_last_checkpoint_and_the_others_keep_serving(
    system_app: RunningApp, app_db: Database
) -> None:
    victim, bystander = provision(system_app.env, [1_000, 1_000], label="kill")
    workers_before = system_app.worker_pids()
    assert len(workers_before) >= WORKERS

    # A slow stream, on a connection whose port we know.
    conn = http.client.HTTPConnection("127.0.0.1", system_app.port, timeout=30)
    body = {
        "model": MODEL,
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": f"tell me slowly [fake tokens-per-second={TOKENS_PER_SECOND}]",
            }
        ],
    }
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {victim.api_key}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200
    request_id = response.getheader("x-request-id")
    assert request_id
    # Killed after 10 tokens (2.5 s): a few checkpoints have been recorded by then.
    received = 0
    while received < 10:
        line = response.readline()
        assert line, "the stream ended early"
        received += line.startswith(b"data: {") and b'"content"' in line
    assert conn.sock is not None
    client_port = conn.sock.getsockname()[1]

    serving = system_app.pid_serving(client_port)
    assert serving is not None and serving in workers_before, (serving, workers_before)
    killed_at = time.monotonic()
    os.kill(serving, signal.SIGKILL)

    # The client sees the reply end without its [DONE]: a cut, not a clean finish.
    rest = b""
    try:
        while chunk := response.read1(65536):
            rest += chunk
    except (OSError, http.client.HTTPException):
        pass
    conn.close()
    assert b"[DONE]" not in rest
    received += sum(
        1 for line in rest.split(b"\n") if line.startswith(b"data: {") and b'"content"' in line
    )

    # The other workers keep serving, straight away.
    with httpx.Client(timeout=30) as client:
        results = [
            api_call(client, system_app.base_url, bystander.api_key, f"still there? {i}")
            for i in range(10)
        ]
    server_exit = system_app.proc.poll()
    assert [r.status for r in results] == [200] * 10, (
        f"after one worker was killed the others did not serve (server exit code {server_exit}; "
        "Granian stops every worker when one dies unless respawn_failed_workers is set):\n"
        + system_app.log_tail(1500)
    )

    # Within the lease plus a sweep (and a little slack for a busy machine), the sweeper
    # settles the dead call for its last checkpoint.
    lease = float(system_app.env["HOLD_LEASE_SECONDS"])
    sweep = float(system_app.env["HOLD_SWEEP_INTERVAL_SECONDS"])
    checkpoint = float(system_app.env["STREAM_CHECKPOINT_SECONDS"])

    def reclaimed() -> bool:
        hold = holds_by_request(app_db, [request_id])[request_id]
        return hold.status != "pending"

    wait_until(reclaimed, timeout=lease + 2 * sweep + 10, what="the dead call's hold reclaimed")
    waited = time.monotonic() - killed_at
    hold = holds_by_request(app_db, [request_id])[request_id]
    one_checkpoint = int(TOKENS_PER_SECOND * checkpoint) + 1
    assert hold.status == "settled", hold
    assert received - one_checkpoint <= hold.charged <= received, (received, hold)
    (event,) = usage_by_request(app_db, [request_id])[request_id]
    assert (event.outcome, event.charged, event.estimated) == ("lost", hold.charged, True)
    assert waited <= lease + 2 * sweep + 10
    print(f"credits held after the kill: {waited:.1f} s (lease {lease:g} s, sweep {sweep:g} s)")

    balances = accounts(app_db, [victim.user_id, bystander.user_id])
    assert (balances[victim.user_id].balance, balances[victim.user_id].held) == (
        1_000 - hold.charged,
        0,
    )
    assert balances[bystander.user_id].balance == 1_000 - 10 * CALL_COST
    assert_ledger_sound(app_db)

    # Still serving after the sweep, whether or not the server replaced the dead worker.
    with httpx.Client(timeout=30) as client:
        assert api_call(client, system_app.base_url, victim.api_key, "and now?").ok
    assert serving not in system_app.worker_pids()
