"""What a chat request may ask for, checked before anything is reserved or sent upstream.

Every field of OpenAI's chat completions request is in one of two groups. Supported: checked
here, forwarded to the upstream, and counted in the worst case the gateway reserves (the
prompt, tool definitions and schemas, images at the model's bound, n times the output cap).
Refused: UnsupportedParameter, naming the field. A field this module does not know is
refused too, so nothing a client asks for is silently dropped. docs/api.md has the table.

Pure: takes the decoded JSON body and the configured model ids, returns a ChatRequest or
raises InvalidRequest (InvalidParameter, UnsupportedParameter) with a message a person can
act on. What depends on the model (images, reasoning effort) is checked by the gateway.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from aicredits.domain.errors import (
    InvalidParameter,
    InvalidRequest,
    UnknownModel,
    UnsupportedParameter,
)

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_MESSAGES = 500
# OpenAI's own limits, so a request valid there is valid here.
MAX_CHOICES = 128
MAX_TOOLS = 128
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
MAX_METADATA_PAIRS = 16
MAX_NAME_CHARS = 64
MAX_IDENTIFIER_CHARS = 512
SEED_RANGE = (-(2**63), 2**63 - 1)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
VERBOSITIES = ("low", "medium", "high")
IMAGE_DETAILS = ("auto", "low", "high")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Refused, with why. Each would cost something the worst case cannot bound, or deliver
# something this gateway does not meter.
REFUSED: dict[str, str] = {
    "audio": "audio output is not offered here",
    "functions": "the deprecated functions field is not supported here; use tools",
    "function_call": "the deprecated function_call field is not supported here; use tool_choice",
    "moderation": "moderation is not offered here",
    "prediction": (
        "predicted outputs are not offered here: their rejected tokens are billed beyond "
        "the output cap"
    ),
    "prompt_cache_options": "prompt cache options are not offered here",
    "prompt_cache_retention": "prompt cache retention is not offered here",
    "service_tier": (
        "service tiers are not offered here: every call runs at its model's one price"
    ),
    "web_search_options": "web search is not offered here: it is billed per search",
}

# Forwarded as they are once checked (by _options below).
SUPPORTED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "stop",
        "seed",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "metadata",
        "modalities",
        "store",
        "verbosity",
        "reasoning_effort",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    # Forwarded to the upstream as they are (sampling, tools, response_format, n...).
    params: dict[str, Any] = field(default_factory=dict)
    # How many replies (choices) to generate: the output cap is reserved for each.
    n: int = 1
    # How many image parts the messages carry: each is reserved at the model's bound.
    images: int = 0

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        tools: list[dict[str, Any]] | None = self.params.get("tools")
        return tools

    @property
    def response_format(self) -> dict[str, Any] | None:
        response_format: dict[str, Any] | None = self.params.get("response_format")
        return response_format

    @property
    def reasoning_effort(self) -> str | None:
        effort: str | None = self.params.get("reasoning_effort")
        return effort


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not low <= value <= high:
        raise InvalidParameter(f"{name} must be a whole number from {low} to {high}", param=name)
    result: int = value
    return result


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidParameter(f"{name} must be a number from {low:g} to {high:g}", param=name)
    return float(value)


def _bool(body: Mapping[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidParameter(f"{name} must be true or false", param=name)
    return value


def _string(body: Mapping[str, Any], name: str, max_chars: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_chars:
        raise InvalidParameter(
            f"{name} must be a string of at most {max_chars} characters", param=name
        )
    return value


def _choice(body: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if value not in allowed:
        raise InvalidParameter(f"{name} must be one of {', '.join(allowed)}", param=name)
    result: str = value
    return result


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidParameter(f"{where} must be an object", param=where)
    return value


def _no_other_keys(raw: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    """Unknown keys are refused rather than dropped; a null one is as good as absent."""
    for key, value in raw.items():
        if key not in allowed and value is not None:
            raise UnsupportedParameter(
                f"{where}.{key} is not supported here", param=f"{where}.{key}"
            )


# ---- messages ----------------------------------------------------------------------------------


def _parts(content: list[Any], where: str, *, images: bool = False, refusals: bool = False) -> int:
    """Check a message's content parts; returns how many are images."""
    count = 0
    for j, raw in enumerate(content):
        at = f"{where}.content[{j}]"
        part = _object(raw, at)
        kind = part.get("type")
        if kind == "text":
            _no_other_keys(part, ("type", "text"), at)
            if not isinstance(part.get("text"), str):
                raise InvalidParameter(f"{at}: a text part needs a text string", param=at)
        elif kind == "refusal" and refusals:
            _no_other_keys(part, ("type", "refusal"), at)
            if not isinstance(part.get("refusal"), str):
                raise InvalidParameter(f"{at}: a refusal part needs a refusal string", param=at)
        elif kind == "image_url" and images:
            _image_url(part, at)
            count += 1
        else:
            raise _unsupported_part(kind, at)
    return count


def _unsupported_part(kind: Any, at: str) -> InvalidRequest:
    if kind == "input_audio":
        return UnsupportedParameter(f"{at}: audio input is not offered here", param=at)
    if kind == "file":
        return UnsupportedParameter(f"{at}: file input is not offered here", param=at)
    if kind == "image_url":
        return UnsupportedParameter(f"{at}: images are accepted only in user messages", param=at)
    return InvalidParameter(f"{at}: unknown content part type {kind!r}", param=at)


def _image_url(part: Mapping[str, Any], at: str) -> None:
    _no_other_keys(part, ("type", "image_url"), at)
    image = _object(part.get("image_url"), f"{at}.image_url")
    _no_other_keys(image, ("url", "detail"), f"{at}.image_url")
    url = image.get("url")
    if not isinstance(url, str) or not url.startswith(("https://", "http://", "data:image/")):
        raise InvalidParameter(
            f"{at}.image_url.url must be an http(s) URL or a data:image/... URL",
            param=f"{at}.image_url.url",
        )
    if image.get("detail") is not None and image["detail"] not in IMAGE_DETAILS:
        raise InvalidParameter(
            f"{at}.image_url.detail must be one of {', '.join(IMAGE_DETAILS)}",
            param=f"{at}.image_url.detail",
        )


def _tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    at = f"{where}.tool_calls"
    if not isinstance(raw, list) or not raw:
        raise InvalidParameter(f"{at} must be a non-empty list", param=at)
    calls = []
    for k, item in enumerate(raw):
        call = _object(item, f"{at}[{k}]")
        _no_other_keys(call, ("id", "type", "function"), f"{at}[{k}]")
        function = _object(call.get("function"), f"{at}[{k}].function")
        _no_other_keys(function, ("name", "arguments"), f"{at}[{k}].function")
        if (
            not isinstance(call.get("id"), str)
            or call.get("type", "function") != "function"
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise InvalidParameter(
                f"{at}[{k}] must have an id and a function with a name and arguments "
                "(a JSON string)",
                param=f"{at}[{k}]",
            )
        calls.append(
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": function["name"], "arguments": function["arguments"]},
            }
        )
    return calls


# What each role's message may carry. An assistant message passed back from a response may
# also carry its response-only fields: `annotations`, and `audio`/`function_call` as null.
_MESSAGE_KEYS = {
    "system": ("role", "content", "name"),
    "developer": ("role", "content", "name"),
    "user": ("role", "content", "name"),
    "assistant": ("role", "content", "name", "refusal", "tool_calls", "annotations"),
    "tool": ("role", "content", "tool_call_id"),
}


def _message(index: int, raw: Any) -> tuple[dict[str, Any], int]:
    """The message as it is forwarded, and how many images it carries."""
    where = f"messages[{index}]"
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"{where} must be an object with a role and content")
    role = raw.get("role")
    if role == "function":
        raise UnsupportedParameter(
            f"{where}: the deprecated function role is not supported here; use tool messages",
            param=f"{where}.role",
        )
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(sorted(ROLES))}")
    _no_other_keys(raw, _MESSAGE_KEYS[role], where)
    content = raw.get("content")
    message: dict[str, Any] = {"role": role}
    images = 0
    if role == "assistant":
        tool_calls = raw.get("tool_calls")
        refusal = raw.get("refusal")
        if refusal is not None and not isinstance(refusal, str):
            raise InvalidParameter(f"{where}.refusal must be a string", param=f"{where}.refusal")
        if isinstance(content, list):
            _parts(content, where, refusals=True)
        elif content is None:
            if tool_calls is None and refusal is None:
                raise InvalidRequest(
                    f"{where}.content must be a string unless the message has tool_calls"
                )
        elif not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string")
        annotations = raw.get("annotations")
        if annotations is not None and not isinstance(annotations, list):
            raise InvalidParameter(
                f"{where}.annotations must be a list", param=f"{where}.annotations"
            )
        message["content"] = content
        if refusal is not None:
            message["refusal"] = refusal
        if tool_calls is not None:
            message["tool_calls"] = _tool_calls(tool_calls, where)
    else:
        if isinstance(content, list):
            images = _parts(content, where, images=role == "user")
        elif not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string")
        message["content"] = content
    if role == "tool":
        if not isinstance(raw.get("tool_call_id"), str) or not raw["tool_call_id"]:
            raise InvalidParameter(
                f"{where}.tool_call_id is required: the id of the tool call it answers",
                param=f"{where}.tool_call_id",
            )
        message["tool_call_id"] = raw["tool_call_id"]
    elif isinstance(raw.get("name"), str) and raw["name"]:
        message["name"] = raw["name"][:MAX_NAME_CHARS]
    return message, images


# ---- tools and output formats ------------------------------------------------------------------


def _tools(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw or len(raw) > MAX_TOOLS:
        raise InvalidParameter(f"tools must be a list of 1 to {MAX_TOOLS} tools", param="tools")
    tools: list[dict[str, Any]] = []
    for k, item in enumerate(raw):
        at = f"tools[{k}]"
        tool = _object(item, at)
        if tool.get("type") != "function":
            raise UnsupportedParameter(
                f"{at}: only function tools are supported here", param=f"{at}.type"
            )
        _no_other_keys(tool, ("type", "function"), at)
        function = _object(tool.get("function"), f"{at}.function")
        _no_other_keys(function, ("name", "description", "parameters", "strict"), f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidParameter(
                f"{at}.function.name must be 1 to 64 letters, digits, _ or -",
                param=f"{at}.function.name",
            )
        checked: dict[str, Any] = {"name": name}
        if function.get("description") is not None:
            if not isinstance(function["description"], str):
                raise InvalidParameter(
                    f"{at}.function.description must be a string",
                    param=f"{at}.function.description",
                )
            checked["description"] = function["description"]
        if function.get("parameters") is not None:
            checked["parameters"] = dict(
                _object(function["parameters"], f"{at}.function.parameters")
            )
        if function.get("strict") is not None:
            if not isinstance(function["strict"], bool):
                raise InvalidParameter(
                    f"{at}.function.strict must be true or false", param=f"{at}.function.strict"
                )
            checked["strict"] = function["strict"]
        tools.append({"type": "function", "function": checked})
    if len({t["function"]["name"] for t in tools}) != len(tools):
        raise InvalidParameter("tools must have different names", param="tools")
    return tools


def _tool_choice(raw: Any, tools: list[dict[str, Any]] | None) -> Any:
    if raw in ("none", "auto", "required"):
        if raw != "none" and tools is None:
            raise InvalidParameter(f"tool_choice {raw!r} needs tools", param="tool_choice")
        return raw
    choice = _object(raw, "tool_choice")
    if choice.get("type") != "function":
        raise UnsupportedParameter(
            "tool_choice must be none, auto, required or a function", param="tool_choice"
        )
    _no_other_keys(choice, ("type", "function"), "tool_choice")
    function = _object(choice.get("function"), "tool_choice.function")
    _no_other_keys(function, ("name",), "tool_choice.function")
    names = {t["function"]["name"] for t in tools or ()}
    if function.get("name") not in names:
        raise InvalidParameter(
            "tool_choice.function.name must name one of the tools", param="tool_choice"
        )
    return {"type": "function", "function": {"name": function["name"]}}


def _response_format(raw: Any) -> dict[str, Any]:
    form = _object(raw, "response_format")
    kind = form.get("type")
    if kind in ("text", "json_object"):
        _no_other_keys(form, ("type",), "response_format")
        return {"type": kind}
    if kind != "json_schema":
        raise UnsupportedParameter(
            "response_format.type must be text, json_object or json_schema",
            param="response_format.type",
        )
    _no_other_keys(form, ("type", "json_schema"), "response_format")
    spec = _object(form.get("json_schema"), "response_format.json_schema")
    where = "response_format.json_schema"
    _no_other_keys(spec, ("name", "description", "schema", "strict"), where)
    if not isinstance(spec.get("name"), str) or not _NAME.match(spec["name"]):
        raise InvalidParameter(
            f"{where}.name must be 1 to 64 letters, digits, _ or -", param=f"{where}.name"
        )
    checked: dict[str, Any] = {"name": spec["name"]}
    if spec.get("description") is not None:
        if not isinstance(spec["description"], str):
            raise InvalidParameter(
                f"{where}.description must be a string", param=f"{where}.description"
            )
        checked["description"] = spec["description"]
    if spec.get("schema") is not None:
        checked["schema"] = dict(_object(spec["schema"], f"{where}.schema"))
    if spec.get("strict") is not None:
        if not isinstance(spec["strict"], bool):
            raise InvalidParameter(f"{where}.strict must be true or false", param=f"{where}.strict")
        checked["strict"] = spec["strict"]
    return {"type": "json_schema", "json_schema": checked}


# ---- the request -------------------------------------------------------------------------------


def _refuse_unknown_fields(body: Mapping[str, Any]) -> None:
    for name, value in body.items():
        if value is None:
            continue  # null is OpenAI's "not set"
        if name in REFUSED:
            raise UnsupportedParameter(f"{name}: {REFUSED[name]}", param=name)
        if name not in SUPPORTED:
            raise UnsupportedParameter(
                f"{name} is not a chat completions parameter this service supports "
                "(see the table in the API documentation)",
                param=name,
            )


def _output_cap(body: Mapping[str, Any]) -> int | None:
    """max_completion_tokens, or else the older max_tokens; each is checked either way."""
    limit = 2**31 - 1
    max_tokens = _int(body, "max_tokens", 1, limit)
    max_completion_tokens = _int(body, "max_completion_tokens", 1, limit)
    return max_completion_tokens if max_completion_tokens is not None else max_tokens


def _sampling(body: Mapping[str, Any], params: dict[str, Any]) -> None:
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
            or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) for s in stops)
        ):
            raise InvalidParameter(
                f"stop must be a string or a list of up to {MAX_STOP_SEQUENCES} strings",
                param="stop",
            )
        params["stop"] = stop
    seed = _int(body, "seed", *SEED_RANGE)
    if seed is not None:
        params["seed"] = seed
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, Mapping) or len(bias) > MAX_LOGIT_BIAS:
            raise InvalidParameter(
                f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids",
                param="logit_bias",
            )
        for token, value in bias.items():
            if not (isinstance(token, str) and token.isdigit()):
                raise InvalidParameter(
                    f"logit_bias keys must be token ids, not {token!r}", param="logit_bias"
                )
            if not _is_int(value) or not -100 <= value <= 100:
                raise InvalidParameter(
                    f"logit_bias[{token!r}] must be a whole number from -100 to 100",
                    param="logit_bias",
                )
        params["logit_bias"] = dict(bias)


def _output_options(body: Mapping[str, Any], params: dict[str, Any]) -> None:
    logprobs = _bool(body, "logprobs")
    top_logprobs = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if logprobs is not None:
        params["logprobs"] = logprobs
    if top_logprobs is not None:
        if not logprobs:
            raise InvalidParameter("top_logprobs needs logprobs: true", param="top_logprobs")
        params["top_logprobs"] = top_logprobs
    if body.get("response_format") is not None:
        params["response_format"] = _response_format(body["response_format"])
    modalities = body.get("modalities")
    if modalities is not None:
        if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
            raise InvalidParameter("modalities must be a list", param="modalities")
        if modalities != ["text"]:
            raise UnsupportedParameter(
                'modalities: only ["text"] is offered here (no audio output)',
                param="modalities",
            )
        params["modalities"] = ["text"]
    verbosity = _choice(body, "verbosity", VERBOSITIES)
    if verbosity is not None:
        params["verbosity"] = verbosity
    effort = _choice(body, "reasoning_effort", REASONING_EFFORTS)
    if effort is not None:
        params["reasoning_effort"] = effort


def _tool_options(body: Mapping[str, Any], params: dict[str, Any]) -> None:
    tools = _tools(body["tools"]) if body.get("tools") is not None else None
    if tools is not None:
        params["tools"] = tools
    if body.get("tool_choice") is not None:
        params["tool_choice"] = _tool_choice(body["tool_choice"], tools)
    parallel = _bool(body, "parallel_tool_calls")
    if parallel is not None:
        if tools is None:
            raise InvalidParameter("parallel_tool_calls needs tools", param="parallel_tool_calls")
        params["parallel_tool_calls"] = parallel


def _bookkeeping(body: Mapping[str, Any], params: dict[str, Any]) -> None:
    for name, limit in (
        ("user", MAX_IDENTIFIER_CHARS),
        ("safety_identifier", 128),
        ("prompt_cache_key", MAX_IDENTIFIER_CHARS),
    ):
        value = _string(body, name, limit)
        if value is not None:
            params[name] = value
    metadata = body.get("metadata")
    if metadata is not None:
        if (
            not isinstance(metadata, Mapping)
            or len(metadata) > MAX_METADATA_PAIRS
            or not all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            raise InvalidParameter(
                f"metadata must be an object of at most {MAX_METADATA_PAIRS} string pairs "
                "(keys up to 64 characters, values up to 512)",
                param="metadata",
            )
        params["metadata"] = dict(metadata)
    store = _bool(body, "store")
    if store:
        raise UnsupportedParameter(
            "store: stored completions are not offered here (they would be kept in the "
            "operator's provider account)",
            param="store",
        )
    if store is not None:
        params["store"] = False


def _stream_options(body: Mapping[str, Any]) -> bool:
    """Whether the stream ends with a usage chunk."""
    raw = body.get("stream_options")
    if raw is None:
        return False
    options = _object(raw, "stream_options")
    _no_other_keys(options, ("include_usage", "include_obfuscation"), "stream_options")
    include_usage = _bool(options, "include_usage")
    if _bool(options, "include_obfuscation"):
        raise UnsupportedParameter(
            "stream_options.include_obfuscation: this service's events carry no obfuscation",
            param="stream_options.include_obfuscation",
        )
    return bool(include_usage)


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
    _refuse_unknown_fields(body)
    messages = []
    images = 0
    for i, raw in enumerate(raw_messages):
        message, count = _message(i, raw)
        messages.append(message)
        images += count

    max_tokens = _output_cap(body)
    n = _int(body, "n", 1, MAX_CHOICES) or 1
    stream = _bool(body, "stream") or False
    include_usage = _stream_options(body)

    params: dict[str, Any] = {}
    _sampling(body, params)
    _output_options(body, params)
    _tool_options(body, params)
    _bookkeeping(body, params)
    if n > 1:
        params["n"] = n
    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        params=params,
        n=n,
        images=images,
    )
