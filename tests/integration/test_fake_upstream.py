"""The fake upstream, as the official openai client and plain HTTP see it over a real socket."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from aicredits.adapters.tokenizer import (
    count_message_tokens,
    count_prompt_tokens,
    count_text_tokens,
)
from aicredits.devtools import fake_upstream
from aicredits.devtools.fake_upstream import FakeUpstreamConfig, build_app
from tests.servers import serve_asgi

MODEL = "demo-model"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Tell me something, in exactly as many words as you like."},
]


@dataclass
class Upstream:
    base_url: str

    def client(self, **options: Any) -> openai.OpenAI:
        options.setdefault("api_key", "x")
        return openai.OpenAI(base_url=f"{self.base_url}/v1", max_retries=0, **options)

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base_url}/_fake/stats")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def queue(self, **knobs: Any) -> None:
        httpx.post(f"{self.base_url}/_fake/next", json=knobs).raise_for_status()


Serve = Callable[..., Upstream]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start a fake upstream with the given config on a free port; stop them all after."""
    with ExitStack() as stack:

        def start(**config: Any) -> Upstream:
            app = build_app(FakeUpstreamConfig(**config))
            return Upstream(stack.enter_context(serve_asgi(app, ready_path="/_fake/stats")))

        yield start


@pytest.fixture
def upstream(serve: Serve) -> Upstream:
    return serve(reply_tokens=12)


def stream_chunks(client: openai.OpenAI, **kwargs: Any) -> list[ChatCompletionChunk]:
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kwargs)
    return list(stream)


def content_of(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def the_request(upstream: Upstream) -> dict[str, Any]:
    requests = upstream.stats()["requests"]
    assert len(requests) == 1
    record: dict[str, Any] = requests[0]
    return record


# ---- the happy paths -----------------------------------------------------------------------


def test_reply_words_add_up_to_one_token_each() -> None:
    tokens = fake_upstream.reply_tokens(100)
    assert len(tokens) == 100
    assert all(count_text_tokens(t) == 1 for t in tokens)
    assert count_text_tokens("".join(tokens)) == 100


def test_models_endpoint_lists_every_configured_model(serve: Serve) -> None:
    upstream = serve(models=["small", "large"])
    models = upstream.client().models.list().data
    assert [m.id for m in models] == ["small", "large"]
    assert all(m.owned_by == "aicredits-fake" and m.object == "model" for m in models)


def test_non_streaming_reply_matches_its_reported_usage(upstream: Upstream) -> None:
    raw = upstream.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES
    )
    completion = raw.parse()
    text = completion.choices[0].message.content
    assert text is not None
    assert completion.usage is not None
    assert completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 12
    assert count_text_tokens(text) == completion.usage.completion_tokens
    assert completion.usage.prompt_tokens == count_message_tokens(MESSAGES)
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    record = the_request(upstream)
    assert record["request_id"] == raw.headers["x-request-id"]
    assert record["tokens_sent"] == 12
    assert record["completed"] is True
    assert record["stream"] is False


def test_stream_sends_one_token_per_chunk_then_finish_then_usage(upstream: Upstream) -> None:
    stream = upstream.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    request_id = stream.response.headers["x-request-id"]
    chunks = list(stream)

    tokens = content_of(chunks)
    assert len(tokens) == 12
    assert all(count_text_tokens(t) == 1 for t in tokens)
    assert chunks[0].choices[0].delta.role == "assistant"
    # Every chunk but the last two carries exactly one token.
    assert len(chunks) == len(tokens) + 2
    finish = chunks[-2].choices[0]
    assert finish.finish_reason == "stop"
    assert not finish.delta.content
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert usage.completion_tokens == count_text_tokens("".join(tokens)) == len(tokens)
    assert usage.prompt_tokens == count_message_tokens(MESSAGES)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])

    record = the_request(upstream)
    assert record["request_id"] == request_id
    assert record["stream"] is True
    assert record["tokens_sent"] == 12
    assert record["completed"] is True


def test_stream_without_include_usage_sends_no_usage(upstream: Upstream) -> None:
    chunks = stream_chunks(upstream.client())
    assert len(content_of(chunks)) == 12
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_shortens_the_reply_and_finishes_with_length(upstream: Upstream) -> None:
    client = upstream.client()
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    text = completion.choices[0].message.content or ""
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == count_text_tokens(text) == 5

    chunks = stream_chunks(client, max_completion_tokens=4, stream_options={"include_usage": True})
    assert len(content_of(chunks)) == 4
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4

    # A cap above the reply's length changes nothing.
    roomy = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100)
    assert roomy.choices[0].finish_reason == "stop"
    assert roomy.usage is not None
    assert roomy.usage.completion_tokens == 12


# ---- faults --------------------------------------------------------------------------------


def test_fault_500_raises_internal_server_error(upstream: Upstream) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        upstream.client().chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"X-Fake-Fault": "500"}
        )
    assert caught.value.status_code == 500
    assert caught.value.type == "server_error"
    record = the_request(upstream)
    assert record["fault"] == "500"
    assert record["completed"] is False
    assert record["tokens_sent"] == 0


def test_fault_429_raises_rate_limit_error_with_retry_after(upstream: Upstream) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        stream_chunks(upstream.client(), extra_headers={"X-Fake-Fault": "429"})
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.code == "rate_limit_exceeded"


def test_fault_timeout_raises_api_timeout_error(upstream: Upstream) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        upstream.client(timeout=0.5).chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"X-Fake-Fault": "timeout"}
        )
    assert time.monotonic() - started < 5
    record = the_request(upstream)
    assert record["completed"] is False
    assert record["tokens_sent"] == 0
    # The server let go of the hung request when the client left: it still answers.
    assert upstream.client(timeout=5).models.list().data


def test_cut_stream_ends_early_and_stats_count_what_the_client_got(upstream: Upstream) -> None:
    stream = upstream.client().chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Fake-Fault": "cut:4"},
    )
    received: list[ChatCompletionChunk] = []
    # The server drops the connection mid-body, as a crashed upstream would.
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            received.append(chunk)

    tokens = content_of(received)
    assert 0 < len(tokens) < 12
    assert all(c.usage is None for c in received)
    assert all(c.choices[0].finish_reason is None for c in received)
    record = the_request(upstream)
    assert record["fault"] == "cut:4"
    assert record["tokens_sent"] == len(tokens) == 4
    assert record["completed"] is False


def test_cut_without_a_count_sends_three_tokens(upstream: Upstream) -> None:
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in upstream.client().chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_headers={"X-Fake-Fault": "cut"}
        ):
            received.append(chunk)
    assert len(content_of(received)) == 3


def test_non_streaming_cut_returns_truncated_json(upstream: Upstream) -> None:
    response = httpx.post(
        f"{upstream.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES},
        headers={"X-Fake-Fault": "cut"},
    )
    assert response.status_code == 200
    assert response.text.startswith('{"id": "chatcmpl-')
    with pytest.raises(json.JSONDecodeError):
        response.json()
    assert the_request(upstream)["completed"] is False


def test_malformed_event_makes_the_client_raise_while_iterating(upstream: Upstream) -> None:
    received: list[ChatCompletionChunk] = []
    with pytest.raises(json.JSONDecodeError):
        for chunk in upstream.client().chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            extra_headers={"X-Fake-Fault": "malformed:5"},
        ):
            received.append(chunk)
    assert len(content_of(received)) == 5
    record = the_request(upstream)
    assert record["tokens_sent"] == 5
    assert record["completed"] is False


def test_unknown_fault_header_is_refused(upstream: Upstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        upstream.client().chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"X-Fake-Fault": "explode"}
        )
    assert "explode" in caught.value.message
    assert upstream.stats()["chat_requests"] == 0


# ---- the control queue ---------------------------------------------------------------------


def test_queue_applies_to_exactly_count_requests_then_defaults_return(upstream: Upstream) -> None:
    client = upstream.client()
    upstream.queue(reply_tokens=3, count=2)
    upstream.queue(fault="500")

    def completion_tokens() -> int:
        completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert completion.usage is not None
        return completion.usage.completion_tokens

    assert completion_tokens() == 3
    assert completion_tokens() == 3
    with pytest.raises(openai.InternalServerError):
        completion_tokens()
    assert completion_tokens() == 12
    assert completion_tokens() == 12

    stats = upstream.stats()
    assert stats["chat_requests"] == 5
    assert [r["fault"] for r in stats["requests"]] == [None, None, "500", None, None]


def test_headers_win_over_the_queue(upstream: Upstream) -> None:
    client = upstream.client()
    upstream.queue(fault="500", reply_tokens=3)
    completion = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        extra_headers={"X-Fake-Fault": "none", "X-Fake-Reply-Tokens": "7"},
    )
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 7
    # The queued entry was used up by that request, even though its fields lost.
    after = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert after.usage is not None
    assert after.usage.completion_tokens == 12

    # A field the headers leave alone still comes from the queue.
    upstream.queue(fault="500")
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"X-Fake-Reply-Tokens": "5"}
        )
    assert upstream.stats()["requests"][-1]["fault"] == "500"


def test_reset_clears_the_queue_and_the_stats(upstream: Upstream) -> None:
    client = upstream.client()
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    upstream.queue(fault="500", count=3)
    httpx.post(f"{upstream.base_url}/_fake/reset").raise_for_status()
    assert upstream.stats() == {"chat_requests": 0, "requests": []}
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES).usage is not None


def test_queue_refuses_bad_settings(upstream: Upstream) -> None:
    for knobs in ({"fault": "explode"}, {"count": 0}, {"reply_tokens": -1}, {"colour": "red"}):
        response = httpx.post(f"{upstream.base_url}/_fake/next", json=knobs)
        assert response.status_code == 400, knobs
        assert response.json()["error"]["message"]
    assert upstream.client().chat.completions.create(model=MODEL, messages=MESSAGES).usage


# ---- clients that leave --------------------------------------------------------------------


def test_client_that_stops_reading_leaves_true_tokens_sent(serve: Serve) -> None:
    upstream = serve(reply_tokens=100, tokens_per_second=20)
    stream = upstream.client().chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    read = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            read += 1
        if read == 4:
            break
    stream.close()

    # Wait until the server has noticed: the count stops moving (it would move every 50 ms
    # while the stream ran on), or the stream ends, which the asserts below refuse.
    deadline = time.monotonic() + 10
    record = the_request(upstream)
    while True:
        time.sleep(0.2)
        settled, record = record, the_request(upstream)
        if record["tokens_sent"] == settled["tokens_sent"]:
            break
        assert time.monotonic() < deadline, "the server never noticed the client leave"
    # A chunk or two may have been in flight when the client hung up.
    assert read <= record["tokens_sent"] <= read + 3
    assert record["completed"] is False


# ---- refusals ------------------------------------------------------------------------------


def test_unknown_model_is_404_model_not_found(upstream: Upstream) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        upstream.client().chat.completions.create(model="gpt-nonesuch", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert "gpt-nonesuch" in caught.value.message
    assert upstream.stats()["chat_requests"] == 0


def test_empty_messages_is_400(upstream: Upstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        upstream.client().chat.completions.create(model=MODEL, messages=[])
    assert caught.value.type == "invalid_request_error"
    assert upstream.stats()["chat_requests"] == 0


def test_bad_json_is_400_in_openai_error_shape(upstream: Upstream) -> None:
    response = httpx.post(
        f"{upstream.base_url}/v1/chat/completions",
        content=b'{"model": "demo-model", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-request-id"]
    assert upstream.stats()["chat_requests"] == 0


def test_wrong_api_key_is_401_when_a_key_is_configured(serve: Serve) -> None:
    upstream = serve(api_key="sk-right")
    with pytest.raises(openai.AuthenticationError) as caught:
        upstream.client(api_key="sk-wrong").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        upstream.client(api_key="sk-wrong").models.list()
    assert upstream.stats()["chat_requests"] == 0

    right = upstream.client(api_key="sk-right")
    assert right.chat.completions.create(model=MODEL, messages=MESSAGES).usage is not None
    assert [m.id for m in right.models.list().data] == [MODEL]


def test_every_response_carries_a_request_id(upstream: Upstream) -> None:
    base = upstream.base_url
    responses = [
        httpx.get(f"{base}/v1/models"),
        httpx.get(f"{base}/no/such/path"),
        httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": []}),
        httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES},
            headers={"X-Fake-Fault": "429"},
        ),
        httpx.post(f"{base}/_fake/reset"),
    ]
    assert [r.status_code for r in responses] == [200, 404, 400, 429, 200]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids)
    assert len(set(ids)) == len(ids)
    assert responses[1].json()["error"]["message"] == "Not Found"


# ---- pacing --------------------------------------------------------------------------------


def first_chunk_delay(client: openai.OpenAI, **kwargs: Any) -> float:
    started = time.monotonic()
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kwargs)
    next(iter(stream))
    delay = time.monotonic() - started
    stream.close()
    return delay


def test_latency_ms_delays_the_first_byte(serve: Serve) -> None:
    slow = serve(reply_tokens=3, latency_ms=300)
    assert 0.28 <= first_chunk_delay(slow.client()) < 5

    fast = serve(reply_tokens=3)
    assert 0.38 <= first_chunk_delay(fast.client(), extra_headers={"X-Fake-Latency-Ms": "400"}) < 5


def test_tokens_per_second_paces_the_stream(serve: Serve) -> None:
    upstream = serve(reply_tokens=10, tokens_per_second=20)
    client = upstream.client()
    arrivals: list[float] = []
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
    assert len(arrivals) == 10
    # Nine gaps of 1/20 s between ten tokens: at least 0.45 s, spread over the stream.
    assert 0.4 <= arrivals[-1] - arrivals[0] < 5
    assert arrivals[4] - arrivals[0] >= 0.15

    started = time.monotonic()
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert 0.4 <= time.monotonic() - started < 5

    # Headers set the pace per request.
    started = time.monotonic()
    client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        extra_headers={"X-Fake-Tokens-Per-Second": "10", "X-Fake-Reply-Tokens": "6"},
    )
    assert 0.45 <= time.monotonic() - started < 5


# ---- app isolation and the command line ----------------------------------------------------


def test_two_apps_in_one_process_keep_separate_stats(serve: Serve) -> None:
    first, second = serve(), serve()
    first.queue(reply_tokens=2)
    completion = second.client().chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 40  # the default, untouched by first's queue
    assert second.stats()["chat_requests"] == 1
    assert first.stats()["chat_requests"] == 0


def test_main_turns_arguments_into_a_served_config(monkeypatch: pytest.MonkeyPatch) -> None:
    served: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        served.update(kwargs, state=app.state.fake_upstream)

    monkeypatch.setattr(fake_upstream.uvicorn, "run", fake_run)
    argv = ["--port", "9612", "--latency-ms", "15", "--tokens-per-second", "30"]
    assert fake_upstream.main([*argv, "--models", "a, b,,c", "--reply-tokens", "8"]) == 0
    assert served["host"] == "127.0.0.1"
    assert served["port"] == 9612
    config = served["state"].config
    assert config == FakeUpstreamConfig(
        port=9612, latency_ms=15, tokens_per_second=30.0, reply_tokens=8, models=["a", "b", "c"]
    )

    served.clear()
    assert fake_upstream.main([]) == 0
    assert served["port"] == 9500
    assert served["state"].config == FakeUpstreamConfig()
    assert FakeUpstreamConfig().models == ["demo-model"]
    assert FakeUpstreamConfig().reply_tokens == 40


# ---- the rest of the chat surface, and embeddings -----------------------------------------

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
NOON: Any = {"type": "function", "function": {"name": "noon", "parameters": {}}}


def test_tools_get_called_with_arguments_from_their_schema(upstream: Upstream) -> None:
    client = upstream.client()
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER, NOON])
    calls: list[Any] = list(reply.choices[0].message.tool_calls or [])
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["get_weather", "noon"]
    assert json.loads(calls[0].function.arguments) == {"city": "lorem", "days": 1}
    assert reply.usage is not None
    assert reply.usage.completion_tokens == sum(
        count_text_tokens(c.function.name) + count_text_tokens(c.function.arguments) for c in calls
    )
    one = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER, NOON], parallel_tool_calls=False
    )
    assert len(one.choices[0].message.tool_calls or []) == 1
    named = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=[WEATHER, NOON],
        tool_choice={"type": "function", "function": {"name": "noon"}},
    )
    named_calls: list[Any] = list(named.choices[0].message.tool_calls or [])
    assert [c.function.name for c in named_calls] == ["noon"]
    assert (
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[WEATHER], tool_choice="none"
        )
        .choices[0]
        .message.content
    )


def test_a_tool_result_gets_a_text_reply_and_counts_in_the_prompt(upstream: Upstream) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "noon", "arguments": "{}"}}
    messages: Any = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    reply = upstream.client().chat.completions.create(model=MODEL, messages=messages, tools=[NOON])
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == count_prompt_tokens(messages, tools=[NOON])


def test_streamed_tool_calls_come_in_pieces(upstream: Upstream) -> None:
    chunks = stream_chunks(upstream.client(), tools=[WEATHER])
    pieces = [
        call
        for chunk in chunks
        for choice in chunk.choices
        for call in choice.delta.tool_calls or []
    ]
    assert pieces[0].id and pieces[0].function and pieces[0].function.name == "get_weather"
    arguments = "".join((p.function and p.function.arguments) or "" for p in pieces)
    assert json.loads(arguments) == {"city": "lorem", "days": 1}
    assert len(pieces) == 1 + count_text_tokens(arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert the_request(upstream)["tokens_sent"] == count_text_tokens("get_weather") + len(
        pieces[1:]
    )


def test_json_output_follows_the_response_format(upstream: Upstream) -> None:
    client = upstream.client()
    schema: Any = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}},
            "kind": {"enum": ["a", "b"]},
            "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        },
        "$defs": {"Tag": {"type": "object", "properties": {"ok": {"type": "boolean"}}}},
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    content = reply.choices[0].message.content or ""
    assert json.loads(content) == {
        "name": "lorem",
        "tags": [{"ok": True}],
        "kind": "a",
        "score": 1.5,
    }
    assert reply.usage is not None
    assert reply.usage.completion_tokens == count_text_tokens(content)
    json_mode = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format={"type": "json_object"}
    )
    assert set(json.loads(json_mode.choices[0].message.content or "")) == {"reply"}


def test_n_choices_are_different_replies_counted_together(upstream: Upstream) -> None:
    client = upstream.client()
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3)
    texts = [c.message.content or "" for c in reply.choices]
    assert len(set(texts)) == 3 and all(count_text_tokens(t) == 12 for t in texts)
    assert reply.usage is not None and reply.usage.completion_tokens == 36
    chunks = stream_chunks(client, n=2, stream_options={"include_usage": True})
    by_choice: dict[int, int] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.delta.content:
                by_choice[choice.index] = by_choice.get(choice.index, 0) + 1
    assert by_choice == {0: 12, 1: 12}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24


def test_logprobs_come_with_each_token(upstream: Upstream) -> None:
    reply = upstream.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=3
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert "".join(e.token for e in logprobs.content) == reply.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in logprobs.content)


def test_image_parts_count_a_fixed_figure_each(upstream: Upstream) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 2000}}
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]
    reply = upstream.client().chat.completions.create(model=MODEL, messages=messages)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == (
        count_prompt_tokens(messages) + fake_upstream.FAKE_IMAGE_TOKENS
    )
    record = the_request(upstream)
    assert record["images"] == 1
    # Long strings are abbreviated in the stats, so images do not fill its memory.
    assert record["body"]["messages"][0]["content"][1]["image_url"]["url"] == "<2022 characters>"


def test_reasoning_tokens_are_billed_within_the_cap_and_never_streamed(upstream: Upstream) -> None:
    client = upstream.client()
    upstream.queue(reasoning_tokens=5, count=2)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10)
    assert reply.usage is not None and reply.usage.completion_tokens == 10
    assert reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 5
    assert count_text_tokens(reply.choices[0].message.content or "") == 5
    assert reply.choices[0].finish_reason == "length"
    chunks = stream_chunks(client, stream_options={"include_usage": True})
    assert len(content_of(chunks)) == 12
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 17


def test_embeddings_are_deterministic_vectors_with_usage(upstream: Upstream) -> None:
    client = upstream.client()
    first = client.embeddings.create(model=MODEL, input=["a text", "another"])
    again = client.embeddings.create(model=MODEL, input="a text", encoding_format="float")
    assert [len(d.embedding) for d in first.data] == [64, 64]
    assert first.data[0].embedding == pytest.approx(again.data[0].embedding, abs=1e-6)
    assert first.data[0].embedding != first.data[1].embedding
    assert first.usage.prompt_tokens == count_text_tokens("a text") + count_text_tokens("another")
    small = client.embeddings.create(model=MODEL, input=[[1, 2, 3]], dimensions=4)
    assert len(small.data[0].embedding) == 4 and small.usage.prompt_tokens == 3
    records = upstream.stats()["requests"]
    assert [r["endpoint"] for r in records] == ["embeddings"] * 3
    assert records[0]["body"]["encoding_format"] == "base64"  # the SDK's default
    assert upstream.stats()["chat_requests"] == 0
