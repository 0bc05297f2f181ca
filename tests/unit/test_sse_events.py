"""The API's stream events: `data: ` and the compact JSON of the chunk, as json.dumps gives it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aicredits.api.openai_routes import sse_events

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m\u00e9"}


@pytest.mark.parametrize(
    "payload",
    [
        {"choices": [{"index": 0, "delta": {"content": 'h\u00e9 "x"\n'}, "finish_reason": None}]},
        {"choices": [], "usage": {"prompt_tokens": 3}, "aicredits": {"charged": 2}},
        {"choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]},
        {},
    ],
)
def test_an_event_is_the_compact_json_of_base_and_payload(payload: dict[str, Any]) -> None:
    expected = f"data: {json.dumps({**BASE, **payload}, separators=(',', ':'))}\n\n"
    assert sse_events(BASE)(payload) == expected
    assert json.loads(expected.removeprefix("data: ")) == {**BASE, **payload}
