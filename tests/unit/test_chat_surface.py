"""The whole chat completions request: every field supported (checked and forwarded) or
refused by name, nothing silently dropped."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat.completion_create_params import CompletionCreateParamsBase

from aicredits.domain.chat import REFUSED, SUPPORTED, parse_chat_request
from aicredits.domain.errors import InvalidParameter, InvalidRequest, UnsupportedParameter

OK: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def parse(**changes: Any) -> Any:
    return parse_chat_request({**OK, **changes}, models=["m"])


def test_every_field_of_the_official_request_is_supported_or_refused_never_both() -> None:
    fields = set(CompletionCreateParamsBase.__annotations__) | {"stream"}
    assert SUPPORTED.isdisjoint(REFUSED)
    assert fields - SUPPORTED - set(REFUSED) == set()


def test_the_api_documentation_lists_every_field_with_its_status() -> None:
    rows = re.findall(r"^\| `([a-z_]+)` \| (supported|refused)", API_DOC.read_text(), re.M)
    documented = dict(rows)
    assert {name for name, status in documented.items() if status == "refused"} == set(REFUSED)
    assert {name for name, status in documented.items() if status == "supported"} == SUPPORTED


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_field_is_refused_by_name(name: str) -> None:
    with pytest.raises(UnsupportedParameter) as caught:
        parse(**{name: {"anything": 1}})
    assert caught.value.param == name
    assert caught.value.code == "unsupported_parameter"
    assert name in str(caught.value)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_field_sent_as_null_is_not_set(name: str) -> None:
    assert parse(**{name: None}).params == {}


def test_an_unknown_field_is_refused_not_dropped() -> None:
    with pytest.raises(UnsupportedParameter) as caught:
        parse(provider={"order": ["x"]})
    assert caught.value.param == "provider"


NUMERIC = [
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "top_logprobs",
]


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("bad", ["abc", True, [1], {"a": 1}])
def test_a_wrong_type_for_a_numeric_field_names_it_however_the_others_are_set(
    name: str, bad: Any
) -> None:
    others: dict[str, Any] = {"max_tokens": None, "max_completion_tokens": None, "logprobs": True}
    others.pop(name, None)
    with pytest.raises(InvalidParameter) as caught:
        parse(**others, **{name: bad})
    assert caught.value.param == name
    assert name in str(caught.value)


def test_max_tokens_is_checked_even_when_max_completion_tokens_is_null() -> None:
    with pytest.raises(InvalidParameter, match="max_tokens"):
        parse(max_tokens="abc", max_completion_tokens=None)
    with pytest.raises(InvalidParameter, match="max_tokens"):
        parse(max_tokens="abc", max_completion_tokens=20)


def test_a_logit_bias_value_outside_its_range_is_refused() -> None:
    with pytest.raises(InvalidParameter, match="logit_bias"):
        parse(logit_bias={"50256": 101})
    with pytest.raises(InvalidParameter, match="logit_bias"):
        parse(logit_bias={"word": 1})
    assert parse(logit_bias={"50256": -100}).params["logit_bias"] == {"50256": -100}


def test_tools_tool_choice_and_parallel_tool_calls_are_forwarded() -> None:
    request = parse(
        tools=[TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    assert request.params["tools"] == [TOOL]
    assert request.tools == [TOOL]
    assert request.params["tool_choice"] == {
        "type": "function",
        "function": {"name": "get_weather"},
    }
    assert request.params["parallel_tool_calls"] is False


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]"),
        ({"tools": [TOOL, TOOL]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"parallel_tool_calls": True}, "parallel_tool_calls"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
    ],
)
def test_bad_tool_settings_are_refused_by_name(changes: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse(**changes)
    assert caught.value.param.startswith(param)


def test_an_assistant_tool_call_and_the_tool_answer_are_accepted() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    # As the official SDK sends a response's message passed back: response-only fields too.
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "annotations": [],
            "audio": None,
            "function_call": None,
            "tool_calls": [call],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    request = parse(messages=messages, tools=[TOOL])
    assert request.messages[1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert request.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        ({"role": "assistant", "content": None}, "unless the message has tool_calls"),
        ({"role": "assistant", "content": "x", "audio": {"id": "a"}}, "audio"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}, "tool_calls"),
        ({"role": "function", "name": "f", "content": "x"}, "function role"),
        ({"role": "user", "content": "x", "cache": True}, "cache"),
        ({"role": "tool", "content": "x", "tool_call_id": ""}, "tool_call_id"),
    ],
)
def test_malformed_or_unsupported_message_fields_are_refused(
    message: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        parse(messages=[message])


def test_image_parts_are_counted_and_checked() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x.test/cat.png", "detail": "low"}}
    content = [{"type": "text", "text": "what is it?"}, image, image]
    request = parse(messages=[{"role": "user", "content": content}])
    assert request.images == 2
    assert request.messages[0]["content"] == content
    with pytest.raises(InvalidParameter, match="url"):
        parse(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(UnsupportedParameter, match="only in user messages"):
        parse(messages=[{"role": "system", "content": [image]}])
    with pytest.raises(UnsupportedParameter, match="audio input"):
        parse(messages=[{"role": "user", "content": [{"type": "input_audio"}]}])


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "text"},
        {"type": "json_object"},
        {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
        },
    ],
)
def test_response_formats_are_forwarded(response_format: dict[str, Any]) -> None:
    assert parse(response_format=response_format).params["response_format"] == response_format


def test_an_unknown_response_format_is_refused() -> None:
    with pytest.raises(UnsupportedParameter) as caught:
        parse(response_format={"type": "grammar", "grammar": "x"})
    assert caught.value.param == "response_format.type"


def test_logprobs_and_top_logprobs() -> None:
    assert parse(logprobs=True, top_logprobs=3).params == {"logprobs": True, "top_logprobs": 3}
    with pytest.raises(InvalidParameter, match="needs logprobs"):
        parse(top_logprobs=3)
    with pytest.raises(InvalidParameter, match="top_logprobs"):
        parse(logprobs=True, top_logprobs=21)


def test_n_choices_are_kept_and_forwarded() -> None:
    request = parse(n=3)
    assert (request.n, request.params["n"]) == (3, 3)
    assert parse(n=1).params == {}


def test_store_false_is_forwarded_and_store_true_refused() -> None:
    assert parse(store=False).params == {"store": False}
    with pytest.raises(UnsupportedParameter, match="store"):
        parse(store=True)


def test_text_modality_only() -> None:
    assert parse(modalities=["text"]).params == {"modalities": ["text"]}
    with pytest.raises(UnsupportedParameter, match="audio"):
        parse(modalities=["text", "audio"])


def test_stream_options_other_than_include_usage_are_refused() -> None:
    assert parse(stream=True, stream_options={"include_obfuscation": False}).include_usage is False
    with pytest.raises(UnsupportedParameter):
        parse(stream=True, stream_options={"include_obfuscation": True})
    with pytest.raises(UnsupportedParameter):
        parse(stream=True, stream_options={"chunk_size": 3})


def test_bookkeeping_and_reasoning_fields_are_checked_and_forwarded() -> None:
    request = parse(
        metadata={"team": "a"},
        safety_identifier="u-1",
        prompt_cache_key="k",
        verbosity="low",
        reasoning_effort="high",
    )
    assert request.params == {
        "metadata": {"team": "a"},
        "safety_identifier": "u-1",
        "prompt_cache_key": "k",
        "verbosity": "low",
        "reasoning_effort": "high",
    }
    with pytest.raises(InvalidParameter, match="metadata"):
        parse(metadata={str(i): "v" for i in range(17)})
    with pytest.raises(InvalidParameter, match="reasoning_effort"):
        parse(reasoning_effort="maximal")
