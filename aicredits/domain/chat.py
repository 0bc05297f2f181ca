"""What a chat request may ask for, checked before anything is reserved or sent upstream.

Pure: takes the decoded JSON body and the configured model ids, returns a ChatRequest or
raises InvalidRequest with a message a person can act on.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from aicredits.domain.errors import InvalidRequest, UnknownModel

ROLES = frozenset({"system", "developer", "user", "assistant"})
MAX_MESSAGES = 500
# Sampling options (temperature, top_p, stop, penalties, seed) pass through to the upstream.
# Anything that would change what a call costs or how it is counted (n > 1, tools, audio) is
# refused rather than silently mis-metered; other unknown fields are ignored.
REFUSED = {
    "tools": "tools and function calling are not supported by this gateway",
    "functions": "function calling is not supported by this gateway",
    "audio": "audio output is not supported by this gateway",
}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    params: dict[str, Any] = field(default_factory=dict)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a number from {low:g} to {high:g}")
    return float(value)


def _message(index: int, raw: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"{where} must be an object with a role and content")
    role = raw.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(sorted(ROLES))}")
    content = raw.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise InvalidRequest(f"{where}: only text content is supported")
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}: a text part needs a text string")
    elif not isinstance(content, str):
        raise InvalidRequest(f"{where}.content must be a string")
    message: dict[str, Any] = {"role": role, "content": content}
    if isinstance(raw.get("name"), str) and raw["name"]:
        message["name"] = raw["name"][:64]
    return message


def parse_chat_request(body: Any, *, models: Collection[str]) -> ChatRequest:
    """Validate an OpenAI-style chat completion body."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required")
    if model not in models:
        raise UnknownModel(
            f"model {model!r} is not offered here; available: {', '.join(sorted(models))}"
        )
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise InvalidRequest("messages must be a non-empty list")
    if len(raw_messages) > MAX_MESSAGES:
        raise InvalidRequest(f"at most {MAX_MESSAGES} messages per request")
    messages = [_message(i, m) for i, m in enumerate(raw_messages)]

    for name, reason in REFUSED.items():
        if body.get(name):
            raise InvalidRequest(reason)
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise InvalidRequest("n must be 1: one reply per request")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise InvalidRequest("max_tokens must be a whole number of at least 1")

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise InvalidRequest("stream_options must be an object")

    params: dict[str, Any] = {}
    for name, low, high in (
        ("temperature", 0.0, 2.0),
        ("top_p", 0.0, 1.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
    ):
        value = _number(body, name, low, high)
        if value is not None:
            params[name] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or len(stops) > 4
            or not all(isinstance(s, str) for s in stops)
        ):
            raise InvalidRequest("stop must be a string or a list of up to 4 strings")
        params["stop"] = stop
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise InvalidRequest("seed must be a whole number")
        params["seed"] = seed
    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        params=params,
    )
