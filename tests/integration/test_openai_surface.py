"""The whole OpenAI chat surface through /v1, with the official `openai` client (sync and
async) against the fake upstream: tools, structured output, logprobs, several choices,
images, reasoning tokens, embeddings. Each supported field reaches the upstream and its call
is charged within its hold; each refused field is a 400 naming it; on SQLite and Postgres.
The rig's teardown checks that no call recorded unbilled tokens."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from aicredits.adapters.tokenizer import count_prompt_tokens, count_text_tokens
from aicredits.devtools.fake_upstream import FAKE_IMAGE_TOKENS
from aicredits.domain.chat import REFUSED
from aicredits.domain.pricing import usage_cost
from aicredits.settings import EmbeddingModelSpec, ModelSpec
from tests.integration.gateway_fixtures import MESSAGES, MODEL, Rig, running_rig

VISION = ModelSpec(
    id="demo-vision",
    input_per_mtok=2_000,
    output_per_mtok=8_000,
    max_output_tokens=64,
    context_tokens=4_096,
    vision=True,
    max_image_tokens=300,
)
REASONER = ModelSpec(
    id="demo-reasoner",
    input_per_mtok=2_000,
    output_per_mtok=8_000,
    max_output_tokens=64,
    context_tokens=4_096,
    reasoning=True,
)
EMBEDDER = EmbeddingModelSpec(id="demo-embedding", input_per_mtok=100, max_input_tokens=50)
# Typed as Any: the SDK's TypedDicts take these as literals only.
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}
WEATHER_ARGS = {"city": "lorem", "days": 1}
IMAGE: Any = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.fixture
def rig(db_url: str) -> Iterator[Rig]:
    with running_rig(db_url, models=[MODEL, VISION, REASONER], embedding_models=[EMBEDDER]) as r:
        yield r


def post(rig: Rig, key: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{rig.api}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=30,
    )


def async_client(rig: Rig, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{rig.api}/v1", api_key=key, max_retries=0)


def sent_upstream(rig: Rig) -> dict[str, Any]:
    """The body of the last request the fake upstream was sent."""
    body: dict[str, Any] = rig.upstream_stats()["requests"][-1]["body"]
    return body


def charged_within_hold(rig: Rig, request_id: str) -> Any:
    """The call's usage event, after checking it was charged in full and within its hold."""
    (event,) = [e for e in rig.usage_events_all() if e.request_id == request_id]
    hold = rig.hold(request_id)
    assert hold.status == "settled"
    assert event.charged == event.cost == hold.charged <= hold.amount
    assert event.unbilled == 0
    return event


def tool_call_tokens(name: str, arguments: dict[str, Any]) -> int:
    return count_text_tokens(name) + count_text_tokens(json.dumps(arguments))


# --- tools and function calling ----------------------------------------------------------------


def test_a_tool_call_comes_back_with_its_arguments_and_is_charged_for_them(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    raw = rig.client(key).chat.completions.with_raw_response.create(
        model=MODEL.id,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice="auto",
    )
    reply = raw.parse()
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER_ARGS
    assert reply.usage is not None
    assert reply.usage.completion_tokens == tool_call_tokens("get_weather", WEATHER_ARGS)
    body = sent_upstream(rig)
    assert (body["tools"], body["tool_choice"]) == ([WEATHER], "auto")
    event = charged_within_hold(rig, raw.headers["x-request-id"])
    # The tool definitions are in the prompt the usage reports, and in the worst case.
    assert event.input_tokens == reply.usage.prompt_tokens
    assert reply.usage.prompt_tokens == count_prompt_tokens(
        [{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER]
    )


def test_streamed_tool_call_deltas_accumulate_into_the_arguments(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    stream = rig.client(key).chat.completions.create(
        model=MODEL.id,
        messages=[{"role": "user", "content": "Weather and time in Oslo?"}],
        tools=[WEATHER, TIME],
        stream=True,
        stream_options={"include_usage": True},
    )
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    pieces = 0
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                pieces += 1
                if call.function and call.function.name:
                    names[call.index] = call.function.name
                if call.function and call.function.arguments:
                    arguments[call.index] = arguments.get(call.index, "") + call.function.arguments
        usage = chunk.usage
    assert finish == "tool_calls"
    assert pieces > 2  # the arguments came in pieces, passed on as they came
    assert names == {0: "get_weather", 1: "get_time"}
    assert json.loads(arguments[0]) == WEATHER_ARGS
    assert json.loads(arguments[1]) == {"zone": "lorem"}
    assert usage is not None
    assert usage.completion_tokens == tool_call_tokens(
        "get_weather", WEATHER_ARGS
    ) + tool_call_tokens("get_time", {"zone": "lorem"})
    assert sent_upstream(rig)["tools"] == [WEATHER, TIME]


def test_parallel_tool_calls_false_reaches_the_upstream(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    reply = rig.client(key).chat.completions.create(
        model=MODEL.id,
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        parallel_tool_calls=False,
    )
    assert len(reply.choices[0].message.tool_calls or []) == 1
    assert sent_upstream(rig)["parallel_tool_calls"] is False


def test_the_assistant_tool_call_and_the_tool_answer_go_back_and_get_a_reply(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    client = rig.client(key)
    question: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    first = client.chat.completions.create(model=MODEL.id, messages=question, tools=[WEATHER])
    call = (first.choices[0].message.tool_calls or [])[0]
    # The SDK's own message object, passed back as the SDK documents.
    conversation = [
        *question,
        first.choices[0].message,
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL.id,
        messages=conversation,
        tools=[WEATHER],
    )
    second = raw.parse()
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content
    sent = sent_upstream(rig)["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.id
    assert sent[2] == {"role": "tool", "content": '{"forecast": "sunny"}', "tool_call_id": call.id}
    event = charged_within_hold(rig, raw.headers["x-request-id"])
    assert event.input_tokens == count_prompt_tokens(sent, tools=[WEATHER])


def test_async_client_streams_tool_calls(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)

    async def run() -> str:
        client = async_client(rig, key)
        arguments = ""
        async with client:
            stream = await client.chat.completions.create(
                model=MODEL.id,
                messages=MESSAGES,
                tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                stream=True,
            )
            async for chunk in stream:
                for choice in chunk.choices:
                    for call in choice.delta.tool_calls or []:
                        arguments += (call.function and call.function.arguments) or ""
        return arguments

    assert json.loads(asyncio.run(run())) == WEATHER_ARGS
    assert sent_upstream(rig)["tool_choice"] == {
        "type": "function",
        "function": {"name": "get_weather"},
    }


# --- structured output and log probabilities ---------------------------------------------------


class Forecast(BaseModel):
    city: str
    days: int
    sunny: bool


def test_the_parse_helper_gets_a_value_of_its_pydantic_model(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    completion = rig.client(key).chat.completions.parse(
        model=MODEL.id, messages=MESSAGES, response_format=Forecast
    )
    assert completion.choices[0].message.parsed == Forecast(city="lorem", days=1, sunny=True)
    sent = sent_upstream(rig)["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Forecast"
    assert sent["json_schema"]["strict"] is True


def test_the_async_parse_helper_and_json_mode(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)

    async def run() -> tuple[Any, Any]:
        async with async_client(rig, key) as client:
            parsed = await client.chat.completions.parse(
                model=MODEL.id, messages=MESSAGES, response_format=Forecast
            )
            json_mode = await client.chat.completions.create(
                model=MODEL.id, messages=MESSAGES, response_format={"type": "json_object"}
            )
        return parsed, json_mode

    parsed, json_mode = asyncio.run(run())
    assert parsed.choices[0].message.parsed == Forecast(city="lorem", days=1, sunny=True)
    assert set(json.loads(json_mode.choices[0].message.content)) == {"reply"}
    assert sent_upstream(rig)["response_format"] == {"type": "json_object"}


def test_log_probabilities_come_back_streamed_and_not(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    client = rig.client(key)
    reply = client.chat.completions.create(
        model=MODEL.id, messages=MESSAGES, logprobs=True, top_logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == 20
    assert all(len(entry.top_logprobs) == 2 for entry in logprobs.content)
    assert "".join(entry.token for entry in logprobs.content) == reply.choices[0].message.content
    body = sent_upstream(rig)
    assert (body["logprobs"], body["top_logprobs"]) == (True, 2)

    chunks = list(
        client.chat.completions.create(
            model=MODEL.id, messages=MESSAGES, logprobs=True, top_logprobs=1, stream=True
        )
    )
    tokens = [
        entry.token
        for chunk in chunks
        for choice in chunk.choices
        if choice.logprobs and choice.logprobs.content
        for entry in choice.logprobs.content
    ]
    assert len(tokens) == 20


# --- several choices ---------------------------------------------------------------------------


def test_n_choices_are_held_n_times_and_charged_as_reported(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    raw = rig.client(key).chat.completions.with_raw_response.create(
        model=MODEL.id, messages=MESSAGES, n=3
    )
    reply = raw.parse()
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) == 3 and all(count_text_tokens(t or "") == 20 for t in texts)
    assert reply.usage is not None and reply.usage.completion_tokens == 60
    assert sent_upstream(rig)["n"] == 3
    request_id = raw.headers["x-request-id"]
    prompt = count_prompt_tokens(MESSAGES)
    assert rig.hold(request_id).amount == usage_cost(
        rig.price(), input_tokens=prompt, output_tokens=3 * MODEL.max_output_tokens
    )
    event = charged_within_hold(rig, request_id)
    assert event.charged == usage_cost(rig.price(), input_tokens=prompt, output_tokens=60)


def test_a_stream_of_n_choices_carries_and_bills_every_choice(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    stream = rig.client(key).chat.completions.create(
        model=MODEL.id, messages=MESSAGES, n=3, stream=True, stream_options={"include_usage": True}
    )
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        usage = chunk.usage
    assert sorted(texts) == [0, 1, 2]
    assert all(count_text_tokens(text) == 20 for text in texts.values())
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert usage is not None and usage.completion_tokens == 60


def test_a_cut_stream_of_n_choices_is_charged_for_every_choices_delivered_text(rig: Rig) -> None:
    user, key = rig.user(credits=10_000)
    rig.queue(fault="cut:10")
    texts: dict[int, str] = {}
    with httpx.stream(
        "POST",
        f"{rig.api}/v1/chat/completions",
        json={"model": MODEL.id, "messages": MESSAGES, "n": 3, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    for line in lines[:-1]:
        for choice in json.loads(line[6:])["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["delta"]["content"]
    assert '"upstream_cut"' in lines[-1]
    assert sorted(texts) == [0, 1, 2]  # the ten pieces went round the three choices
    delivered = sum(count_text_tokens(text) for text in texts.values())
    assert delivered == 10
    (event,) = rig.usage_events(user)
    assert (event.outcome, event.estimated, event.output_tokens) == ("cut", True, 10)
    assert event.charged == usage_cost(
        rig.price(), input_tokens=event.input_tokens, output_tokens=10
    )


# --- images -----------------------------------------------------------------------------------


def test_an_image_on_a_vision_model_is_held_at_its_bound_and_charged_as_reported(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    messages: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}
    ]
    raw = rig.client(key).chat.completions.with_raw_response.create(
        model=VISION.id, messages=messages
    )
    reply = raw.parse()
    text_tokens = count_prompt_tokens(messages)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == text_tokens + FAKE_IMAGE_TOKENS
    assert sent_upstream(rig)["messages"][0]["content"][1] == IMAGE
    request_id = raw.headers["x-request-id"]
    price = rig.price(VISION.id)
    assert rig.hold(request_id).amount == usage_cost(
        price,
        input_tokens=text_tokens + VISION.max_image_tokens,
        output_tokens=VISION.max_output_tokens,
    )
    event = charged_within_hold(rig, request_id)
    assert event.input_tokens == text_tokens + FAKE_IMAGE_TOKENS
    assert event.charged == usage_cost(
        price, input_tokens=text_tokens + FAKE_IMAGE_TOKENS, output_tokens=20
    )


def test_an_image_on_a_model_without_vision_is_refused(rig: Rig) -> None:
    user, key = rig.user(credits=10_000)
    with pytest.raises(openai.BadRequestError) as caught:
        rig.client(key).chat.completions.create(
            model=MODEL.id,
            messages=[{"role": "user", "content": [{"type": "text", "text": "What?"}, IMAGE]}],
        )
    error = caught.value.response.json()["error"]
    assert error["code"] == "unsupported_parameter"
    assert error["param"] == "messages"
    assert "does not take images" in error["message"]
    assert rig.upstream_stats()["chat_requests"] == 0
    assert rig.balance(user).held == 0


# --- reasoning ----------------------------------------------------------------------------------


def test_reasoning_tokens_are_charged_as_output_within_the_cap(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    rig.queue(reasoning_tokens=10)
    raw = rig.client(key).chat.completions.with_raw_response.create(
        model=REASONER.id, messages=MESSAGES, max_completion_tokens=40, reasoning_effort="low"
    )
    reply = raw.parse()
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 10 + 20
    assert reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 10
    body = sent_upstream(rig)
    # A reasoning model's cap is max_completion_tokens: it bounds the reasoning too.
    assert body["max_completion_tokens"] == 40 and "max_tokens" not in body
    assert body["reasoning_effort"] == "low"
    event = charged_within_hold(rig, raw.headers["x-request-id"])
    assert event.output_tokens == 30

    rig.queue(reasoning_tokens=10)
    capped = rig.client(key).chat.completions.with_raw_response.create(
        model=REASONER.id, messages=MESSAGES, max_completion_tokens=15
    )
    assert capped.parse().choices[0].finish_reason == "length"
    assert charged_within_hold(rig, capped.headers["x-request-id"]).output_tokens == 15


def test_reasoning_effort_on_a_model_that_does_not_reason_is_refused(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    response = post(rig, key, {"model": MODEL.id, "messages": MESSAGES, "reasoning_effort": "low"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "reasoning_effort"
    assert rig.upstream_stats()["chat_requests"] == 0


# --- every supported field reaches the upstream, every refused one is a 400 ---------------------

TOOLED = {"tools": [WEATHER]}
SUPPORTED_CASES: list[tuple[str, dict[str, Any], str, Any]] = [
    ("temperature", {"temperature": 0.3}, "temperature", 0.3),
    ("top_p", {"top_p": 0.9}, "top_p", 0.9),
    ("presence_penalty", {"presence_penalty": 0.5}, "presence_penalty", 0.5),
    ("frequency_penalty", {"frequency_penalty": -0.5}, "frequency_penalty", -0.5),
    ("stop", {"stop": ["zzz"]}, "stop", ["zzz"]),
    ("seed", {"seed": 42}, "seed", 42),
    ("logit_bias", {"logit_bias": {"1000": 5}}, "logit_bias", {"1000": 5}),
    ("logprobs", {"logprobs": True}, "logprobs", True),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 3}, "top_logprobs", 3),
    ("user", {"user": "end-user-1"}, "user", "end-user-1"),
    ("safety_identifier", {"safety_identifier": "h1"}, "safety_identifier", "h1"),
    ("prompt_cache_key", {"prompt_cache_key": "k1"}, "prompt_cache_key", "k1"),
    ("metadata", {"metadata": {"team": "a"}}, "metadata", {"team": "a"}),
    ("modalities", {"modalities": ["text"]}, "modalities", ["text"]),
    ("store", {"store": False}, "store", False),
    ("verbosity", {"verbosity": "low"}, "verbosity", "low"),
    (
        "response_format",
        {"response_format": {"type": "json_object"}},
        "response_format",
        {"type": "json_object"},
    ),
    ("tools", TOOLED, "tools", [WEATHER]),
    ("tool_choice", {**TOOLED, "tool_choice": "none"}, "tool_choice", "none"),
    ("parallel_tool_calls", {**TOOLED, "parallel_tool_calls": False}, "parallel_tool_calls", False),
    ("n", {"n": 2}, "n", 2),
    ("max_tokens", {"max_tokens": 10}, "max_tokens", 10),
    ("max_completion_tokens", {"max_completion_tokens": 12}, "max_tokens", 12),
    ("stream", {"stream": True}, "stream", True),
    (
        "stream_options",
        {"stream": True, "stream_options": {"include_usage": True}},
        "stream_options",
        {"include_usage": True},
    ),
    ("messages", {}, "messages", MESSAGES),
    ("model", {}, "model", MODEL.id),
]


@pytest.mark.parametrize(
    ("fields", "sent_as", "expected"),
    [case[1:] for case in SUPPORTED_CASES],
    ids=[case[0] for case in SUPPORTED_CASES],
)
def test_a_supported_field_reaches_the_upstream_and_the_hold_bounds_the_charge(
    rig: Rig, fields: dict[str, Any], sent_as: str, expected: Any
) -> None:
    _, key = rig.user(credits=10_000)
    response = post(rig, key, {"model": MODEL.id, "messages": MESSAGES, **fields})
    assert response.status_code == 200, response.text
    response.read()
    rig.wait_settled()
    assert sent_upstream(rig)[sent_as] == expected
    charged_within_hold(rig, response.headers["x-request-id"])


REFUSED_VALUES: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"},
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
    "moderation": {"model": "omni-moderation-latest"},
    "prediction": {"type": "content", "content": "a draft"},
    "prompt_cache_options": {"mode": "implicit"},
    "prompt_cache_retention": "24h",
    "service_tier": "priority",
    "web_search_options": {},
}
REFUSED_CASES: list[tuple[dict[str, Any], str]] = [
    *(({name: REFUSED_VALUES[name]}, name) for name in sorted(REFUSED)),
    ({"store": True}, "store"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    (
        {"stream": True, "stream_options": {"include_obfuscation": True}},
        "stream_options.include_obfuscation",
    ),
    ({"response_format": {"type": "grammar"}}, "response_format.type"),
    ({"provider": {"order": ["x"]}}, "provider"),
    (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        "messages[0].content[0]",
    ),
]


def test_every_refused_field_has_a_case() -> None:
    assert set(REFUSED_VALUES) == set(REFUSED)


@pytest.mark.parametrize(("fields", "param"), REFUSED_CASES, ids=[c[1] for c in REFUSED_CASES])
def test_a_refused_field_is_a_400_naming_it_and_nothing_is_held(
    rig: Rig, fields: dict[str, Any], param: str
) -> None:
    user, key = rig.user(credits=10_000)
    response = post(rig, key, {"model": MODEL.id, "messages": MESSAGES, **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", param)
    assert param.split("[")[0].split(".")[0] in error["message"]
    assert rig.balance(user).held == 0
    assert rig.upstream_stats()["chat_requests"] == 0


def test_a_refused_field_through_the_sdk_is_a_bad_request(rig: Rig) -> None:
    _, key = rig.user(credits=10_000)
    with pytest.raises(openai.BadRequestError) as caught:
        rig.client(key).chat.completions.create(
            model=MODEL.id, messages=MESSAGES, service_tier="flex"
        )
    assert caught.value.code == "unsupported_parameter"
    assert caught.value.param == "service_tier"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": "abc", "max_completion_tokens": None}, "max_tokens"),
        ({"max_completion_tokens": "abc", "max_tokens": 10}, "max_completion_tokens"),
        ({"n": "3"}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"seed": 1.5}, "seed"),
        ({"logprobs": True, "top_logprobs": "2"}, "top_logprobs"),
        ({"frequency_penalty": [1]}, "frequency_penalty"),
    ],
)
def test_a_wrong_type_for_a_numeric_field_is_a_400_naming_it(
    rig: Rig, fields: dict[str, Any], param: str
) -> None:
    _, key = rig.user(credits=10_000)
    response = post(rig, key, {"model": MODEL.id, "messages": MESSAGES, **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert rig.upstream_stats()["chat_requests"] == 0


# --- idempotency keys ---------------------------------------------------------------------------


def test_an_over_long_idempotency_key_is_refused_as_such(rig: Rig) -> None:
    user, key = rig.user(credits=10_000)
    body = {"model": MODEL.id, "messages": MESSAGES}
    response = post(rig, key, body, **{"Idempotency-Key": "k" * 201})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_idempotency_key"
    assert post(rig, key, body, **{"Idempotency-Key": "k" * 200}).status_code == 200
    assert rig.balance(user).held == 0


def test_a_reused_idempotency_key_with_another_body_is_a_409_without_internal_ids(
    rig: Rig,
) -> None:
    user, key = rig.user(credits=10_000)
    headers = {"Idempotency-Key": "order-7"}
    rig.queue(tokens_per_second=20)  # the first call runs for about a second
    first: list[httpx.Response] = []
    running = threading.Thread(
        target=lambda: first.append(
            post(rig, key, {"model": MODEL.id, "messages": MESSAGES}, **headers)
        )
    )
    running.start()
    deadline = time.monotonic() + 10
    while rig.upstream_stats()["chat_requests"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    longer = "Something else entirely, in rather more words than the first request had."
    other = {"model": MODEL.id, "messages": [{"role": "user", "content": longer}]}
    during = post(rig, key, other, **headers)
    same_during = post(rig, key, {"model": MODEL.id, "messages": MESSAGES}, **headers)
    running.join()
    after = post(rig, key, other, **headers)
    assert first[0].status_code == 200
    for response in (during, after):
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "idempotency_conflict"
        assert "idem:" not in error["message"] and str(user) not in error["message"]
        assert "order-7" not in error["message"]
    assert same_during.status_code == 409
    assert same_during.json()["error"]["code"] == "duplicate_request"
    assert rig.upstream_stats()["chat_requests"] == 1


def test_a_reused_key_with_a_body_of_the_same_size_is_told_apart_from_a_retry(rig: Rig) -> None:
    """Model and prompt size alone do not make a request the same: any field that differs
    (the words, a parameter) is another request. The same body, however its JSON is
    written, is the same request."""
    user, key = rig.user(credits=10_000)
    headers = {"Idempotency-Key": "order-8"}
    short = [{"role": "user", "content": "Say something short."}]
    long = [{"role": "user", "content": "Say something long."}]
    first: dict[str, Any] = {"model": MODEL.id, "messages": short}
    words: dict[str, Any] = {"model": MODEL.id, "messages": long}
    prompts = [count_prompt_tokens(messages) for messages in (short, long)]
    assert prompts[0] == prompts[1]  # the same size: only the digest tells them apart
    assert post(rig, key, first, **headers).status_code == 200
    balance = rig.balance(user).balance
    for other in (words, {**first, "temperature": 0.5}):
        response = post(rig, key, other, **headers)
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "idempotency_conflict"
    # The same request, its keys in another order and spaced out: a retry.
    again = json.dumps({"messages": first["messages"], "model": MODEL.id}, indent=2)
    retried = httpx.post(
        f"{rig.api}/v1/chat/completions",
        content=again,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
        timeout=30,
    )
    assert retried.status_code == 409
    assert retried.json()["error"]["code"] == "duplicate_request"
    assert rig.upstream_stats()["chat_requests"] == 1
    assert rig.balance(user).balance == balance and rig.balance(user).held == 0


# --- embeddings ---------------------------------------------------------------------------------


def test_embeddings_are_metered_by_their_input_tokens(rig: Rig) -> None:
    user, key = rig.user(credits=1_000)
    inputs = ["the first text", "and a second, somewhat longer, text"]
    # The SDK asks for base64 by default and decodes it: the encoding passes through.
    raw = rig.client(key).embeddings.with_raw_response.create(model=EMBEDDER.id, input=inputs)
    reply = raw.parse()
    assert [d.index for d in reply.data] == [0, 1]
    assert all(len(d.embedding) == 64 for d in reply.data)
    tokens = sum(count_text_tokens(text) for text in inputs)
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (tokens, tokens)
    assert sent_upstream(rig)["encoding_format"] == "base64"
    request_id = raw.headers["x-request-id"]
    cost = usage_cost(rig.price(EMBEDDER.id), input_tokens=tokens, output_tokens=0)
    assert rig.hold(request_id).amount == cost
    event = charged_within_hold(rig, request_id)
    assert (event.model, event.input_tokens, event.output_tokens) == (EMBEDDER.id, tokens, 0)
    assert rig.balance(user).balance == 1_000 - cost


def test_embedding_fields_reach_the_upstream(rig: Rig) -> None:
    _, key = rig.user(credits=1_000)
    reply = rig.client(key).embeddings.create(
        model=EMBEDDER.id, input=[[1, 2, 3], [4, 5]], dimensions=8, encoding_format="float",
        user="end-user-1",
    )  # fmt: skip
    assert [len(d.embedding) for d in reply.data] == [8, 8]
    assert reply.usage.prompt_tokens == 5
    body = sent_upstream(rig)
    assert (body["input"], body["dimensions"], body["encoding_format"], body["user"]) == (
        [[1, 2, 3], [4, 5]],
        8,
        "float",
        "end-user-1",
    )


def test_embeddings_with_the_async_client(rig: Rig) -> None:
    _, key = rig.user(credits=1_000)

    async def run() -> Any:
        async with async_client(rig, key) as client:
            return await client.embeddings.create(model=EMBEDDER.id, input="one text")

    reply = asyncio.run(run())
    assert len(reply.data) == 1 and len(reply.data[0].embedding) == 64
    assert reply.usage.prompt_tokens == count_text_tokens("one text")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"input": "x", "format": "f"}, 400, "unsupported_parameter"),
        ({"input": "word " * 60}, 400, "invalid_request"),
        ({"input": ""}, 400, "invalid_request"),
        ({"input": "x", "dimensions": "8"}, 400, "invalid_request"),
        ({"input": "x", "model": "nope"}, 400, "unknown_model"),
        ({"input": "x", "model": MODEL.id}, 400, "unknown_model"),
    ],
)
def test_bad_embedding_requests_are_refused_before_the_upstream(
    rig: Rig, body: dict[str, Any], status: int, code: str
) -> None:
    user, key = rig.user(credits=1_000)
    response = httpx.post(
        f"{rig.api}/v1/embeddings",
        json={"model": EMBEDDER.id, **body},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert rig.balance(user).held == 0
    assert not [r for r in rig.upstream_stats()["requests"] if r["endpoint"] == "embeddings"]


def test_an_embedding_call_the_upstream_fails_costs_nothing(rig: Rig) -> None:
    user, key = rig.user(credits=1_000)
    rig.queue(fault="500", count=5)
    with pytest.raises(openai.APIStatusError) as caught:
        rig.client(key).embeddings.create(model=EMBEDDER.id, input="x")
    assert caught.value.status_code == 502
    assert rig.balance(user).balance == 1_000
    assert rig.usage_events(user) == []


def test_models_lists_capabilities_and_embedding_models(rig: Rig) -> None:
    _, key = rig.user(credits=1)
    data = httpx.get(f"{rig.api}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    by_id = {m["id"]: m for m in data["data"]}
    assert by_id[VISION.id]["capabilities"]["vision"] is True
    assert by_id[MODEL.id]["capabilities"]["vision"] is False
    assert by_id[REASONER.id]["capabilities"]["reasoning"] is True
    assert by_id[EMBEDDER.id]["capabilities"] == {"embeddings": True}
    assert by_id[EMBEDDER.id]["pricing"] == {"unit": "credits per 1K tokens", "input": "0.1"}


def test_an_embedding_key_reused_for_other_inputs_of_the_same_size_is_a_conflict(
    rig: Rig,
) -> None:
    user, key = rig.user(credits=1_000)
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "embed-1"}

    def embed(text: str) -> httpx.Response:
        body = {"model": EMBEDDER.id, "input": text}
        return httpx.post(f"{rig.api}/v1/embeddings", json=body, headers=headers, timeout=30)

    assert count_text_tokens("red apples") == count_text_tokens("green apples")
    assert embed("red apples").status_code == 200
    other, again = embed("green apples"), embed("red apples")
    assert (other.status_code, other.json()["error"]["code"]) == (409, "idempotency_conflict")
    assert (again.status_code, again.json()["error"]["code"]) == (409, "duplicate_request")
    assert len([r for r in rig.upstream_stats()["requests"] if r["endpoint"] == "embeddings"]) == 1
    assert rig.balance(user).held == 0
