"""What a chat request may ask for, checked before anything is reserved."""

from typing import Any

import pytest

from aicredits.adapters.upstream import normalise_usage
from aicredits.domain.chat import parse_chat_request
from aicredits.domain.errors import InvalidRequest, UnknownModel

OK: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(**changes: Any) -> Any:
    return parse_chat_request({**OK, **changes}, models=["m"])


def test_a_plain_request_parses_with_defaults() -> None:
    request = parse()
    assert (request.model, request.max_tokens, request.stream, request.include_usage) == (
        "m",
        None,
        False,
        False,
    )
    assert request.messages == [{"role": "user", "content": "hi"}]


def test_sampling_and_bookkeeping_options_pass_through() -> None:
    request = parse(temperature=0.5, top_p=1, stop=["x"], seed=7, logit_bias={}, user="u")
    assert request.params == {
        "temperature": 0.5,
        "top_p": 1.0,
        "stop": ["x"],
        "seed": 7,
        "logit_bias": {},
        "user": "u",
    }


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert parse(max_tokens=50, max_completion_tokens=20).max_tokens == 20


def test_stream_options_include_usage() -> None:
    assert parse(stream=True, stream_options={"include_usage": True}).include_usage


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"model": None}, "model is required"),
        ({"messages": []}, "non-empty"),
        ({"messages": "hi"}, "non-empty"),
        ({"messages": [{"role": "user"}]}, "content must be a string"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url must"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"n": 0}, "n must be a whole number"),
        ({"tools": [{}]}, "tools"),
        ({"temperature": 3}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        parse(**changes)


def test_an_unknown_model_lists_the_offered_ones() -> None:
    with pytest.raises(UnknownModel, match="available: m"):
        parse(model="gpt-9")


def test_text_parts_are_accepted() -> None:
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert parse(messages=[{"role": "user", "content": content}]).messages[0]["content"] == content


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 4}, (3, 4)),
        ({"input_tokens": 5, "output_tokens": 6}, (5, 6)),
        ({"prompt_tokens": 3}, None),
        (None, None),
    ],
)
def test_usage_field_names_are_normalised(raw: Any, expected: tuple[int, int] | None) -> None:
    usage = normalise_usage(raw)
    assert (None if usage is None else (usage.input_tokens, usage.output_tokens)) == expected
