"""A production worker asked to stop (SIGTERM: a deploy, `docker stop`) in the middle of
replies: it lets them finish for DRAIN_GRACE_SECONDS, then cuts them. The API stream ends
with an OpenAI-shaped error event, the chat keeps the partial reply with a note, and each is
charged exactly the tokens it delivered; no hold is left pending. Granian replaces the worker.

The model costs one credit per output token and nothing for the prompt (harness.MODELS), so
a charge is a token count.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from typing import Any

import httpx
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import chat_messages
from aicredits.adapters.tokenizer import count_text_tokens
from tests.system.clients import ChatClient, api_call
from tests.system.conftest import assert_ledger_sound, holds_by_request, usage_by_request
from tests.system.harness import MODEL, RunningApp, provision, wait_until

WORKERS = 2
GRACE = 2.0
APP_ENV = {
    # Replies here take 10 s (40 tokens at 4 a second): longer than the grace, so the stop
    # cuts them, and than the harness's usual 4 s reply limit.
    "DRAIN_GRACE_SECONDS": str(GRACE),
    "UPSTREAM_MAX_SECONDS": "60",
}
SLOW = "[fake tokens-per-second=4]"


def open_stream(app: RunningApp, api_key: str, prompt: str) -> tuple[Any, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def read_events(response: Any) -> tuple[int, list[dict[str, Any]], bool]:
    """(tokens received, error events, whether [DONE] came) until the stream ends."""
    tokens, errors, done = 0, [], False
    while line := response.readline():
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            done = True
            continue
        event = json.loads(data)
        if "error" in event:
            errors.append(event["error"])
        for choice in event.get("choices", []):
            if choice.get("delta", {}).get("content"):
                tokens += 1
    return tokens, errors, done


def test_a_client_that_leaves_an_api_stream_stops_it_at_once_and_pays_for_what_it_got(
    system_app: RunningApp, app_db: Database
) -> None:
    """Not a stop, but the same path under Granian: the event stream hears the client leave
    (api/openai_routes.EventStream) and the turn settles for what was delivered, without
    waiting for the 10 s reply to end."""
    (user,) = provision(system_app.env, [1_000], label="client-leaves")
    conn, response = open_stream(system_app, user.api_key, f"go slowly {SLOW}")
    request_id = response.getheader("x-request-id")
    for _ in range(3):
        assert response.readline().startswith(b"data: ")
        response.readline()  # the blank line after each event
    left_at = time.monotonic()
    conn.close()

    def settled() -> bool:
        return holds_by_request(app_db, [request_id])[request_id].status == "settled"

    wait_until(settled, timeout=8, what="the left stream settled")
    assert time.monotonic() - left_at < 5
    (event,) = usage_by_request(app_db, [request_id])[request_id]
    assert event.outcome == "stopped"
    assert 3 <= event.charged < 40
    assert_ledger_sound(app_db)


def test_a_stopped_worker_cuts_an_api_stream_with_an_error_event_and_charges_what_it_sent(
    system_app: RunningApp, app_db: Database
) -> None:
    (user,) = provision(system_app.env, [1_000], label="sigterm-api")
    conn, response = open_stream(system_app, user.api_key, f"take your time {SLOW}")
    request_id = response.getheader("x-request-id")
    first = response.readline()
    assert first.startswith(b"data: ")
    assert conn.sock is not None
    worker = system_app.pid_serving(conn.sock.getsockname()[1])
    assert worker in system_app.worker_pids()
    stopped_at = time.monotonic()
    os.kill(worker, signal.SIGTERM)

    tokens, errors, done = read_events(response)
    conn.close()
    tokens += 1  # the first line read above
    waited = time.monotonic() - stopped_at
    assert not done
    (error,) = errors
    assert (error["code"], error["type"]) == ("server_restarting", "server_error")
    assert GRACE - 0.5 <= waited <= GRACE + 5, waited  # finished within the grace, then cut
    assert 0 < tokens < 40

    hold = holds_by_request(app_db, [request_id])[request_id]
    (event,) = usage_by_request(app_db, [request_id])[request_id]
    assert (hold.status, hold.charged) == ("settled", tokens)
    assert (event.outcome, event.output_tokens, event.charged) == ("interrupted", tokens, tokens)
    assert error["aicredits"]["credits_charged"] == tokens

    # The server goes on, with a new worker in the stopped one's place.
    wait_until(
        lambda: len(system_app.worker_pids()) >= WORKERS and worker not in system_app.worker_pids(),
        timeout=60,
        what="the stopped worker replaced",
    )
    with httpx.Client(timeout=30) as client:
        assert api_call(client, system_app.base_url, user.api_key, "and now?").ok
    assert_ledger_sound(app_db)


def test_a_stopped_worker_cuts_a_chat_reply_keeps_it_with_a_note_and_charges_what_it_showed(
    system_app: RunningApp, app_db: Database
) -> None:
    (user,) = provision(system_app.env, [1_000], label="sigterm-chat")
    with ChatClient(system_app.base_url, user.session) as tab:
        worker = system_app.pid_serving(tab.local_port())
        assert worker in system_app.worker_pids()
        # It may be the replacement for the worker the test before stopped.
        system_app.wait_until_settled_in(worker)
        tab.start_send(f"a slow one please {SLOW}")
        tab.wait_for_reply_text(min_words=3)
        os.kill(worker, signal.SIGTERM)
        last = tab.wait_for_reply_end(timeout=GRACE + 15)
    assert "server restart" in last["note"], last

    with app_db.read() as conn:
        message = conn.execute(
            sa.select(chat_messages).where(chat_messages.c.role == "assistant")
            .order_by(chat_messages.c.id.desc()).limit(1)
        ).one()  # fmt: skip
    delivered = count_text_tokens(message.content)
    (event,) = usage_by_request(app_db, [message.request_id])[message.request_id]
    hold = holds_by_request(app_db, [message.request_id])[message.request_id]
    assert message.outcome == event.outcome == "interrupted"
    assert 0 < delivered < 40
    assert message.content == last["content"]  # what the page showed is what was kept
    assert message.credits_charged == event.charged == hold.charged == delivered
    wait_until(lambda: len(system_app.worker_pids()) >= WORKERS, timeout=60, what="a new worker")
    assert_ledger_sound(app_db)
