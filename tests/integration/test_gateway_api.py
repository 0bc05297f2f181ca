"""The metered gateway through the OpenAI-compatible API, with the official `openai` client,
against the fake upstream: every path of DESIGN.md's request flow, on SQLite and Postgres."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Iterator, Sequence

import httpx
import openai
import pytest
import redis
from starlette.applications import Starlette

from aicredits.adapters.tokenizer import count_message_tokens
from aicredits.api.routes import api_transformers
from aicredits.domain.pricing import usage_cost
from aicredits.services import api_keys
from tests.dbutil import empty_postgres
from tests.integration.gateway_fixtures import MESSAGES, MODEL, Rig, running_rig


@pytest.fixture
def rig(db_url: str) -> Iterator[Rig]:
    with running_rig(db_url) as r:
        yield r


def worst_case(rig: Rig, max_tokens: int = MODEL.max_output_tokens) -> int:
    return usage_cost(
        rig.price(), input_tokens=count_message_tokens(MESSAGES), output_tokens=max_tokens
    )


# --- success -----------------------------------------------------------------------------------


def test_a_call_is_charged_its_actual_usage_and_recorded(rig: Rig) -> None:
    user, key = rig.user(credits=1_000)
    raw = rig.client(key).chat.completions.with_raw_response.create(
        model=MODEL.id,
        messages=MESSAGES,
    )
    reply = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == count_message_tokens(MESSAGES)
    assert reply.usage.completion_tokens == 20
    cost = usage_cost(rig.price(), input_tokens=reply.usage.prompt_tokens, output_tokens=20)
    assert rig.balance(user).balance == 1_000 - cost
    assert rig.balance(user).held == 0
    (event,) = rig.usage_events(user)
    assert (event.model, event.input_tokens, event.output_tokens) == (MODEL.id, 12, 20)
    assert (event.cost, event.charged, event.estimated) == (cost, cost, False)
    assert event.price_version_id == rig.price().version_id
    assert event.request_id == raw.headers["x-request-id"]


def test_a_streamed_call_streams_and_is_charged_exactly(rig: Rig) -> None:
    user, key = rig.user(credits=1_000)
    stream = rig.client(key).chat.completions.create(
        model=MODEL.id,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) == 20
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 20
    cost = usage_cost(rig.price(), input_tokens=usage.prompt_tokens, output_tokens=20)
    assert rig.balance(user).balance == 1_000 - cost
    assert [e.outcome for e in rig.usage_events(user)] == ["completed"]


def test_max_tokens_is_clamped_to_the_models_limit(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    rig.queue(reply_tokens=500)
    reply = rig.client(key).chat.completions.create(
        model=MODEL.id,
        messages=MESSAGES,
        max_tokens=100_000,
    )
    assert reply.usage is not None and reply.usage.completion_tokens == MODEL.max_output_tokens
    assert reply.choices[0].finish_reason == "length"


def test_models_are_listed_with_prices(rig: Rig) -> None:
    _, key = rig.user(credits=1)
    models = rig.client(key).models.list()
    assert [m.id for m in models.data] == [MODEL.id]
    raw = httpx.get(f"{rig.api}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert raw["data"][0]["pricing"] == {
        "unit": "credits per 1K tokens",
        "input": "2",
        "output": "8",
    }


# --- refusals before any upstream call ---------------------------------------------------------


def test_insufficient_credits_is_refused_before_the_upstream_is_called(rig: Rig) -> None:
    needed = worst_case(rig)
    user, key = rig.user(credits=needed - 1)
    with pytest.raises(openai.APIStatusError) as caught:
        rig.client(key).chat.completions.create(model=MODEL.id, messages=MESSAGES)
    assert caught.value.status_code == 402
    error = caught.value.response.json()["error"]
    assert error["code"] == "insufficient_credits"
    assert (error["needed"], error["available"]) == (needed, needed - 1)
    assert error["buy_url"] == "http://localhost:3000/credits"
    assert "Buy more" in error["message"]
    assert rig.upstream_stats()["chat_requests"] == 0
    assert rig.balance(user).balance == needed - 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "nope", "messages": MESSAGES}, "not offered"),
        ({"model": MODEL.id, "messages": []}, "non-empty"),
        ({"model": MODEL.id, "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL.id, "messages": MESSAGES, "max_tokens": "ten"}, "max_tokens"),
        ({"model": MODEL.id, "messages": MESSAGES, "n": 0}, "n must be"),
        ({"model": MODEL.id, "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
        (
            {"model": MODEL.id, "messages": [{"role": "user", "content": "word " * 5000}]},
            "prompt is",
        ),
        ({"model": MODEL.id, "messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ],
)
def test_bad_requests_get_400_with_a_reason_and_nothing_is_held(
    rig: Rig, body: dict[str, object], fragment: str
) -> None:
    user, key = rig.user(credits=10_000)
    response = httpx.post(
        f"{rig.api}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]
    assert rig.balance(user).held == 0
    assert rig.upstream_stats()["chat_requests"] == 0


def test_invalid_json_gets_400(rig: Rig) -> None:
    _, key = rig.user(credits=10)
    response = httpx.post(
        f"{rig.api}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer aic_wrong", "Basic abc"])
def test_missing_or_bad_keys_get_401(rig: Rig, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = httpx.post(
        f"{rig.api}/v1/chat/completions",
        json={"model": MODEL.id, "messages": MESSAGES},
        headers=headers,
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_a_revoked_key_gets_401(rig: Rig) -> None:
    user, key = rig.user(credits=1_000)
    (view,) = api_keys.list_api_keys(rig.db, user_id=user)
    api_keys.revoke_api_key(rig.db, user_id=user, key_id=view.id)
    with pytest.raises(openai.AuthenticationError):
        rig.client(key).chat.completions.create(model=MODEL.id, messages=MESSAGES)


def test_a_replayed_idempotency_key_runs_once(rig: Rig) -> None:
    user, key = rig.user(credits=1_000)
    client = rig.client(key)
    headers = {"Idempotency-Key": "retry-me"}
    client.chat.completions.create(model=MODEL.id, messages=MESSAGES, extra_headers=headers)
    with pytest.raises(openai.ConflictError):
        client.chat.completions.create(model=MODEL.id, messages=MESSAGES, extra_headers=headers)
    assert len(rig.usage_events(user)) == 1
    assert rig.upstream_stats()["chat_requests"] == 1


# --- upstream failures ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_error_before_output_charges_nothing(rig: Rig, stream: bool) -> None:
    user, key = rig.user(credits=1_000)
    rig.queue(fault="500", count=5)
    with pytest.raises(openai.APIStatusError) as caught:
        rig.client(key).chat.completions.create(
            model=MODEL.id,
            messages=MESSAGES,
            stream=stream,
        )
    assert caught.value.status_code == 502
    assert caught.value.response.json()["error"]["code"] == "upstream_failed"
    assert "Nothing was charged" in caught.value.response.json()["error"]["message"]
    assert rig.balance(user) == rig.balance(user).__class__(user, 1_000, 0)
    assert rig.usage_events(user) == []
    assert rig.upstream_stats()["chat_requests"] == 2  # the first try and one retry


@pytest.mark.parametrize(
    ("upstream_config", "says"),
    [
        ({"api_key": "the-real-key"}, "refused this site's key (HTTP 401)"),
        ({"models": ["another-model"]}, "does not offer this model (HTTP 404)"),
    ],
    ids=["wrong key", "unknown model"],
)
def test_a_refusal_every_call_would_meet_is_said_and_logged_for_the_operator(
    db_url: str,
    upstream_config: dict[str, object],
    says: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong OPENAI_API_KEY or a model the provider does not offer: the caller is told
    what is wrong (not to try again), the operator gets an ERROR naming the setting, and
    nothing is charged."""
    with running_rig(db_url, upstream_config=upstream_config, openai_api_key="sk-wrong") as rig:
        user, key = rig.user(credits=1_000)
        with (
            caplog.at_level(logging.ERROR, logger="aicredits.services.gateway"),
            pytest.raises(openai.APIStatusError) as caught,
        ):
            rig.client(key).chat.completions.create(model=MODEL.id, messages=MESSAGES)
        error = caught.value.response.json()["error"]
        assert caught.value.status_code == 502 and error["code"] == "upstream_failed"
        assert says in error["message"] and "Nothing was charged" in error["message"]
        assert rig.balance(user).balance == 1_000
        assert rig.usage_events(user) == []
    hint = "OPENAI_API_KEY" if "api_key" in upstream_config else "MODELS"
    assert any(hint in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_a_429_before_the_first_token_is_retried(rig: Rig) -> None:
    user, key = rig.user(credits=1_000)
    rig.queue(fault="429", count=1)
    reply = rig.client(key).chat.completions.create(model=MODEL.id, messages=MESSAGES)
    assert reply.usage is not None and reply.usage.completion_tokens == 20
    assert rig.upstream_stats()["chat_requests"] == 2
    assert len(rig.usage_events(user)) == 1


def test_an_upstream_timeout_charges_nothing(db_url: str) -> None:
    with running_rig(db_url, upstream_read_timeout=0.5, upstream_retries=0) as rig:
        user, key = rig.user(credits=1_000)
        rig.queue(fault="timeout")
        with pytest.raises(openai.APIStatusError) as caught:
            rig.client(key).chat.completions.create(model=MODEL.id, messages=MESSAGES)
        assert caught.value.status_code == 502
        assert rig.balance(user).balance == 1_000
        assert rig.usage_events(user) == []


@pytest.mark.parametrize("fault", ["cut:7", "malformed:7"])
def test_a_stream_broken_mid_way_charges_the_delivered_tokens(rig: Rig, fault: str) -> None:
    user, key = rig.user(credits=1_000)
    rig.queue(fault=fault)
    received: list[str] = []
    with httpx.stream(
        "POST",
        f"{rig.api}/v1/chat/completions",
        json={"model": MODEL.id, "messages": MESSAGES, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    for line in lines:
        if '"content"' in line:
            received.append(line)
    assert len(received) == 7
    assert '"upstream_cut"' in lines[-1]
    (event,) = rig.usage_events(user)
    assert (event.outcome, event.estimated, event.output_tokens) == ("cut", True, 7)
    cost = usage_cost(rig.price(), input_tokens=event.input_tokens, output_tokens=7)
    assert event.charged == cost > 0
    assert rig.balance(user).balance == 1_000 - cost


def test_a_non_streamed_call_cut_mid_way_charges_nothing(rig: Rig) -> None:
    user, key = rig.user(credits=1_000)
    rig.queue(fault="cut:7")
    with pytest.raises(openai.APIStatusError) as caught:
        rig.client(key).chat.completions.create(model=MODEL.id, messages=MESSAGES)
    assert caught.value.status_code == 502
    assert rig.balance(user).balance == 1_000


def test_a_client_that_disconnects_mid_stream_pays_for_what_it_got(rig: Rig) -> None:
    user, key = rig.user(credits=10_000)
    rig.queue(reply_tokens=60, tokens_per_second=40)
    read = 0
    with httpx.stream(
        "POST",
        f"{rig.api}/v1/chat/completions",
        json={"model": MODEL.id, "messages": MESSAGES, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                read += 1
                if read == 10:
                    break
    rig.wait_settled()
    (event,) = rig.usage_events(user)
    sent = rig.upstream_stats()["requests"][-1]["tokens_sent"]
    assert event.outcome == "stopped" and event.estimated
    assert read <= event.output_tokens < 60
    assert abs(event.output_tokens - sent) <= max(1, round(0.02 * sent))
    assert rig.balance(user).balance == 10_000 - event.charged
    assert event.charged > 0


# --- limits and concurrency -------------------------------------------------------------------


def test_the_per_user_rate_limit_answers_429_with_retry_after(db_url: str) -> None:
    with running_rig(db_url, rate_limit_user_per_minute=2) as rig:
        user, key = rig.user(credits=10_000)
        client = rig.client(key)
        for _ in range(2):
            client.chat.completions.create(model=MODEL.id, messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=MODEL.id, messages=MESSAGES)
        assert caught.value.response.json()["error"]["code"] == "rate_limited"
        assert int(caught.value.response.headers["retry-after"]) >= 1
        assert rig.upstream_stats()["chat_requests"] == 2
        assert rig.balance(user).held == 0


def statuses_by_peer(rig: Rig, calls: Sequence[tuple[str, str | None]], key: str) -> list[int]:
    """POST /v1/chat/completions through the app's whole middleware stack, in process, each
    call from the given peer address with the given X-Forwarded-For. One event loop for all,
    so every call meets the same in-process rate limiter, as in one worker."""
    api, secure = api_transformers(rig.settings)
    assert isinstance(api, Starlette) and not isinstance(secure, Starlette)
    app = secure(api)

    async def run() -> list[int]:
        statuses = []
        for peer, forwarded in calls:
            transport = httpx.ASGITransport(app=app, client=(peer, 40000))
            headers = {"Authorization": f"Bearer {key}"}
            if forwarded is not None:
                headers["X-Forwarded-For"] = forwarded
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                response = await client.post(
                    "/v1/chat/completions",
                    json={"model": MODEL.id, "messages": MESSAGES},
                    headers=headers,
                    timeout=30,
                )
            statuses.append(response.status_code)
        return statuses

    return asyncio.run(run())


def test_behind_a_trusted_proxy_each_client_has_its_own_per_ip_limit(db_url: str) -> None:
    with running_rig(db_url, rate_limit_ip_per_minute=2, trusted_proxies=["10.0.0.1"]) as rig:
        _, key = rig.user(credits=10_000)
        first, second = "203.0.113.1", "203.0.113.2"
        calls = [("10.0.0.1", first)] * 3 + [("10.0.0.1", second)] * 3
        assert statuses_by_peer(rig, calls, key) == [200, 200, 429, 200, 200, 429]
        assert rig.upstream_stats()["chat_requests"] == 4


def test_from_an_untrusted_peer_x_forwarded_for_does_not_change_the_per_ip_limit(
    db_url: str,
) -> None:
    with running_rig(db_url, rate_limit_ip_per_minute=2, trusted_proxies=["10.0.0.1"]) as rig:
        _, key = rig.user(credits=10_000)
        calls: list[tuple[str, str | None]] = [
            ("198.51.100.9", f"203.0.113.{n}") for n in (1, 2, 3)
        ]
        calls += [("198.51.100.9", None)]
        # Another peer is another bucket: the limit was the peer's, not everyone's.
        calls += [("198.51.100.10", "203.0.113.1")]
        assert statuses_by_peer(rig, calls, key) == [200, 200, 429, 429, 200]
        assert rig.upstream_stats()["chat_requests"] == 3


def hundred_calls_on_a_balance_for_20(rig: Rig) -> int:
    # Each call's reply is exactly its worst case, so every success costs the same and the
    # balance pays for exactly 20 of them, whatever the interleaving.
    rig.queue(reply_tokens=MODEL.max_output_tokens, count=200)
    per_call = worst_case(rig)
    user, key = rig.user(credits=20 * per_call)
    outcomes: Counter[int] = Counter()
    lock = threading.Lock()
    gate = threading.Barrier(100)

    def call() -> None:
        gate.wait()
        response = httpx.post(
            f"{rig.api}/v1/chat/completions",
            json={"model": MODEL.id, "messages": MESSAGES},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        with lock:
            outcomes[response.status_code] += 1

    threads = [threading.Thread(target=call) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == Counter({200: 20, 402: 80})
    assert rig.balance(user).balance == 0
    assert len(rig.usage_events(user)) == 20
    assert rig.upstream_stats()["chat_requests"] == 20
    return user


@pytest.mark.slow
def test_100_parallel_calls_on_a_balance_for_20_give_exactly_20(db_url: str) -> None:
    with running_rig(db_url) as rig:
        hundred_calls_on_a_balance_for_20(rig)


@pytest.mark.slow
@pytest.mark.postgres
def test_100_parallel_calls_on_postgres_with_redis_limits(pg_url: str, redis_url: str) -> None:
    empty_postgres(pg_url)
    client = redis.Redis.from_url(redis_url)
    for stale in client.scan_iter("aicredits:rl:*"):  # user ids restart at 1 in every run
        client.delete(stale)
    with running_rig(
        pg_url, redis_url=redis_url, rate_limit_user_per_minute=1_000, rate_limit_concurrent=100
    ) as rig:
        user = hundred_calls_on_a_balance_for_20(rig)
        # The limits really went through Redis: this user's window holds all 100 requests.
        assert client.zcard(f"aicredits:rl:u:{user}") == 100
