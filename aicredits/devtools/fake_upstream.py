"""A fake OpenAI-compatible chat upstream, for development, tests and benchmarks.

It answers `GET /v1/models`, `POST /v1/chat/completions` (streaming or not) and `POST
/v1/embeddings` with deterministic replies whose token counts are known exactly under the
project's tokenizer, so tests can check metering to the token without a real model or
network. It can be slowed down (latency before the first byte, a tokens-per-second pace) and
told to fail the way real upstreams do (500, 429, hanging, a stream cut mid-way, a malformed
event).

It speaks the chat surface the gateway forwards: `n` choices (each its own reply), tool
calls (with `tools` and a tool_choice other than none it calls the functions, with
arguments made from their parameter schemas, unless the last message is a tool result),
JSON output (`response_format` json_object, or json_schema: a value of the schema),
`logprobs` with `top_logprobs`, image parts (each counted as FAKE_IMAGE_TOKENS in the usage),
and reasoning tokens (the `reasoning-tokens` knob: billed in completion_tokens, inside the
output cap, never streamed).

Run it with `python -m aicredits.devtools.fake_upstream --port 9500` and point the app at
`http://127.0.0.1:9500/v1`. Per-request behaviour comes from `X-Fake-*` request headers, from
markers in the prompt such as `[fake fault=cut:3]` or `[fake tokens-per-second=5]` (for
callers that cannot set headers: the chat page, or the app's own /v1 API in front of this),
or from a queue filled with `POST /_fake/next`, in that order of precedence; `GET
/_fake/stats` reports what each request was sent (its body, long strings abbreviated) and
what it was answered, and `POST /_fake/reset` clears the queue and the stats.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import math
import re
import struct
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aicredits.adapters.tokenizer import (
    count_image_parts,
    count_prompt_tokens,
    count_text_tokens,
    split_tokens,
)

# Space-prefixed lowercase words that cl100k encodes as one token each. The tokenizer splits
# text before every such word, so a reply of N of them is exactly N tokens: the client's
# count and the reported usage agree. Checked below, because not every word qualifies
# (" nostrud" and " laboris" are two tokens each).
_REPLY_TEXT = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis"
)
REPLY_WORDS: tuple[str, ...] = tuple(" " + word for word in _REPLY_TEXT.split())

# A hung upstream is given up on after this long, so a forgotten fault cannot hold a
# connection forever.
TIMEOUT_FAULT_SECONDS = 60.0
# Stats keep the most recent requests only, so a long benchmark does not grow memory.
MAX_RECORDED_REQUESTS = 10_000
DEFAULT_CUT_TOKENS = 3
DEFAULT_MALFORMED_TOKENS = 2
NO_FAULT = "none"
# What one image part costs in the fake's usage: OpenAI's figure for a low-detail image.
FAKE_IMAGE_TOKENS = 85
MAX_PARALLEL_TOOL_CALLS = 3
EMBEDDING_DIMENSIONS = 64
# A recorded body's strings longer than this are abbreviated (images as data URLs).
MAX_RECORDED_STRING = 1_000

HEADER_FAULT = "x-fake-fault"
HEADER_REPLY_TOKENS = "x-fake-reply-tokens"
HEADER_LATENCY_MS = "x-fake-latency-ms"
HEADER_TOKENS_PER_SECOND = "x-fake-tokens-per-second"
HEADER_REASONING_TOKENS = "x-fake-reasoning-tokens"
HEADER_REQUEST_ID = "x-request-id"


def _check_reply_words() -> None:
    for word in REPLY_WORDS:
        if count_text_tokens(word) != 1:
            raise AssertionError(f"reply word {word!r} is not exactly one token")
    for first in REPLY_WORDS:
        for second in REPLY_WORDS:
            if count_text_tokens(first + second) != 2:
                raise AssertionError(f"{first + second!r} is not exactly two tokens")
    # The reply cycles through the words, so the wrap-around must add up too.
    cycle = REPLY_WORDS * 2
    if count_text_tokens("".join(cycle)) != len(cycle):
        raise AssertionError("the reply words do not add up to one token each")


_check_reply_words()


def reply_tokens(n: int, *, start: int = 0) -> list[str]:
    """The first `n` tokens of the fake reply (from word `start`: each choice of several
    starts further on); the reply text is their concatenation."""
    return [REPLY_WORDS[(start + i) % len(REPLY_WORDS)] for i in range(n)]


@dataclass
class FakeUpstreamConfig:
    host: str = "127.0.0.1"
    port: int = 9500
    latency_ms: int = 0
    tokens_per_second: float = 0.0  # 0 means as fast as possible
    reply_tokens: int = 40
    models: list[str] = field(default_factory=lambda: ["demo-model"])
    api_key: str | None = None  # when set, /v1/* requires `Authorization: Bearer <api_key>`


@dataclass
class _Knobs:
    """Per-request overrides; None means "not set here", so the next source decides."""

    fault: str | None = None
    reply_tokens: int | None = None
    latency_ms: int | None = None
    tokens_per_second: float | None = None
    reasoning_tokens: int | None = None


@dataclass
class _QueuedKnobs:
    knobs: _Knobs
    remaining: int


@dataclass
class _RequestRecord:
    request_id: str
    model: str
    stream: bool
    fault: str | None
    prompt_tokens: int
    tokens_sent: int = 0
    completed: bool = False
    endpoint: str = "chat"
    # What the usage says was generated, over every choice, reasoning included.
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    images: int = 0
    # The request body as received (long strings abbreviated).
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class _FakeState:
    config: FakeUpstreamConfig
    queue: deque[_QueuedKnobs] = field(default_factory=deque)
    records: deque[_RequestRecord] = field(
        default_factory=lambda: deque(maxlen=MAX_RECORDED_REQUESTS)
    )
    chat_requests: int = 0

    def next_queued(self) -> _Knobs:
        if not self.queue:
            return _Knobs()
        head = self.queue[0]
        head.remaining -= 1
        if head.remaining <= 0:
            self.queue.popleft()
        return head.knobs


class _BadRequest(Exception):
    """A request the fake refuses with 400; the message is shown to the client."""


class _DropConnection(Exception):
    """Raised by a stream to end the HTTP response without finishing it."""


# ---- OpenAI-shaped responses ---------------------------------------------------------------


def _new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def _error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


class _RequestIdMiddleware:
    """Gives every response an x-request-id, unless the endpoint already chose one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if HEADER_REQUEST_ID not in headers:
                    headers[HEADER_REQUEST_ID] = _new_request_id()
            await send(message)

        await self.app(scope, receive, send_with_id)


class _EventStream(Response):
    """An SSE response that stops when the client leaves and can end like a dropped link.

    Starlette's StreamingResponse always finishes the body, so a server crash mid-stream
    could not be imitated with it. Returning without the final body message makes uvicorn
    close the connection, which the client sees as an incomplete chunked body.
    """

    def __init__(self, frames: AsyncGenerator[bytes, None], headers: Mapping[str, str]) -> None:
        self.frames = frames
        self.status_code = 200
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers({"cache-control": "no-cache", **headers})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async with anyio.create_task_group() as tasks:
            # uvicorn silently drops writes to a closed connection, so without this watcher
            # a stream whose client left would run to the end and overstate tokens_sent.
            tasks.start_soon(_cancel_on_disconnect, receive, tasks.cancel_scope)
            try:
                async with aclosing(self.frames) as frames:
                    async for frame in frames:
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
            except (_DropConnection, OSError):
                pass  # OSError: servers on ASGI spec 2.4+ raise it when the client has gone
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            tasks.cancel_scope.cancel()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _wait_unless_disconnected(request: Request, seconds: float) -> bool:
    """Wait `seconds`; return True early if the client disconnects meanwhile."""
    if seconds <= 0:
        return False
    with anyio.move_on_after(seconds):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        return True
    return False


# ---- parsing -------------------------------------------------------------------------------


def _parse_fault(value: str) -> str:
    fault = value.strip().lower()
    if fault in ("500", "429", "timeout", NO_FAULT):
        return fault
    kind, sep, count = fault.partition(":")
    if kind in ("cut", "malformed") and (not sep or count.isdigit()):
        return fault
    raise _BadRequest(
        f"unknown fault {value!r}: use 500, 429, timeout, cut[:N], malformed[:N] or none"
    )


def _fault_count(fault: str, default: int) -> int:
    _, sep, count = fault.partition(":")
    return int(count) if sep else default


def _non_negative_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadRequest(f"{name} must be a non-negative integer")
    return value


def _non_negative_number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadRequest(f"{name} must be a non-negative number")
    if not math.isfinite(value) or value < 0:
        raise _BadRequest(f"{name} must be a finite, non-negative number")
    return float(value)


def _header_knobs(request: Request) -> _Knobs:
    headers = request.headers

    def number(name: str, kind: type[int] | type[float]) -> Any:
        raw = headers.get(name)
        if raw is None:
            return None
        try:
            value = kind(raw)
        except ValueError:
            raise _BadRequest(f"header {name} must be a {kind.__name__}, got {raw!r}") from None
        if not math.isfinite(value) or value < 0:
            raise _BadRequest(f"header {name} must be a finite, non-negative number")
        return value

    fault = headers.get(HEADER_FAULT)
    return _Knobs(
        fault=_parse_fault(fault) if fault is not None else None,
        reply_tokens=number(HEADER_REPLY_TOKENS, int),
        latency_ms=number(HEADER_LATENCY_MS, int),
        tokens_per_second=number(HEADER_TOKENS_PER_SECOND, float),
        reasoning_tokens=number(HEADER_REASONING_TOKENS, int),
    )


_PROMPT_MARKER = re.compile(r"\[fake ([a-z-]+)=([^\]\s]+)\]")


def _prompt_knobs(messages: Sequence[Mapping[str, Any]]) -> _Knobs:
    """Knobs from `[fake name=value]` markers in the last message's text (earlier turns of a
    conversation repeat their markers, which must not apply again); the last one wins."""
    knobs = _Knobs()
    for message in messages[-1:]:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(
                part["text"]
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
        if not isinstance(content, str):
            continue
        for name, raw in _PROMPT_MARKER.findall(content):
            try:
                if name == "fault":
                    knobs.fault = _parse_fault(raw)
                elif name == "reply-tokens":
                    knobs.reply_tokens = _non_negative_int(int(raw), name)
                elif name == "latency-ms":
                    knobs.latency_ms = _non_negative_int(int(raw), name)
                elif name == "tokens-per-second":
                    knobs.tokens_per_second = _non_negative_number(float(raw), name)
                elif name == "reasoning-tokens":
                    knobs.reasoning_tokens = _non_negative_int(int(raw), name)
                else:
                    raise _BadRequest(f"unknown prompt marker [fake {name}=...]")
            except ValueError:
                raise _BadRequest(f"prompt marker {name} has a bad value {raw!r}") from None
    return knobs


def _merge(*sources: _Knobs, config: FakeUpstreamConfig) -> _Knobs:
    """The first source that sets a field wins, field by field; the config fills the rest."""

    def pick(name: str, default: Any) -> Any:
        values = (getattr(source, name) for source in sources)
        return next((value for value in values if value is not None), default)

    fault = pick("fault", None)
    return _Knobs(
        fault=None if fault == NO_FAULT else fault,
        reply_tokens=pick("reply_tokens", config.reply_tokens),
        latency_ms=pick("latency_ms", config.latency_ms),
        tokens_per_second=pick("tokens_per_second", config.tokens_per_second),
        reasoning_tokens=pick("reasoning_tokens", 0),
    )


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        raise _BadRequest("the request body is not valid JSON") from None


def _output_cap(body: Mapping[str, Any]) -> int | None:
    caps = []
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadRequest(f"{name} must be a positive integer")
        caps.append(value)
    return min(caps) if caps else None


# ---- endpoints -----------------------------------------------------------------------------


def _state(request: Request) -> _FakeState:
    state: _FakeState = request.app.state.fake_upstream
    return state


def _unauthorized(request: Request) -> JSONResponse | None:
    expected = _state(request).config.api_key
    if expected is None:
        return None
    given = request.headers.get("authorization", "")
    if hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        return None
    return _error(401, "Incorrect API key provided.", code="invalid_api_key")


async def list_models(request: Request) -> Response:
    if (refusal := _unauthorized(request)) is not None:
        return refusal
    models = _state(request).config.models
    data = [
        {"id": m, "object": "model", "created": 0, "owned_by": "aicredits-fake"} for m in models
    ]
    return JSONResponse({"object": "list", "data": data})


# ---- replies -------------------------------------------------------------------------------


@dataclass
class _Frame:
    """One streamed piece of one choice: its delta, the tokens it carries, and its log
    probability entry (content pieces only)."""

    delta: dict[str, Any]
    tokens: int
    logprob: dict[str, Any] | None = None


@dataclass
class _Choice:
    index: int
    frames: list[_Frame]
    finish_reason: str
    reasoning_tokens: int
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return self.reasoning_tokens + sum(frame.tokens for frame in self.frames)

    @property
    def content(self) -> str:
        return "".join(frame.delta.get("content") or "" for frame in self.frames)


def _sample(schema: Any, defs: Mapping[str, Any], depth: int = 0) -> Any:
    """A value of a JSON schema: what a model in structured-output mode would write."""
    if depth > 10 or not isinstance(schema, Mapping):
        return "lorem"
    if isinstance(schema.get("$ref"), str):
        return _sample(defs.get(schema["$ref"].rsplit("/", 1)[-1]), defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _sample(schema[key][0], defs, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties")
        if not isinstance(properties, Mapping):
            return {}
        return {name: _sample(sub, defs, depth + 1) for name, sub in properties.items()}
    samples = {"array": None, "integer": 1, "number": 1.5, "boolean": True, "null": None}
    if kind == "array":
        return [_sample(schema.get("items"), defs, depth + 1)]
    return samples.get(kind, "lorem") if isinstance(kind, str) else "lorem"


def _schema_value(schema: Any) -> Any:
    defs: Mapping[str, Any] = {}
    if isinstance(schema, Mapping):
        found = schema.get("$defs", schema.get("definitions"))
        defs = found if isinstance(found, Mapping) else {}
    return _sample(schema, defs)


def _functions_to_call(body: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The functions the fake model calls: none without tools, with tool_choice none, or
    when answering a tool's result (tool_choice auto); the named one; else up to three (one
    without parallel tool calls)."""
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto")
    if not isinstance(tools, list) or not tools or choice == "none":
        return []
    functions = [
        tool["function"]
        for tool in tools
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
    ]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return [f for f in functions if f.get("name") == name][:1]
    if choice == "auto" and messages and messages[-1].get("role") == "tool":
        return []
    limit = 1 if body.get("parallel_tool_calls") is False else MAX_PARALLEL_TOOL_CALLS
    return functions[:limit]


def _logprob(piece: str, position: int, top: int) -> dict[str, Any]:
    logprob = -round(0.05 * (position % 7), 4)
    alternatives = [piece, *[w for w in REPLY_WORDS if w != piece][: max(top - 1, 0)]]
    return {
        "token": piece,
        "logprob": logprob,
        "bytes": list(piece.encode()),
        "top_logprobs": [
            {"token": alt, "logprob": logprob - rank, "bytes": list(alt.encode())}
            for rank, alt in enumerate(alternatives[:top])
        ],
    }


def _plan_choice(
    index: int,
    *,
    body: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    wanted: int,
    cap: int | None,
    reasoning: int,
) -> _Choice:
    """One choice of the reply, within the output cap (reasoning tokens first)."""
    reasoning = min(reasoning, cap) if cap is not None else reasoning
    budget = None if cap is None else cap - reasoning
    logprobs = body.get("logprobs") is True
    top_logprobs = body.get("top_logprobs")
    top = top_logprobs if isinstance(top_logprobs, int) else 0
    frames: list[_Frame] = []
    calls: list[dict[str, Any]] = []
    functions = _functions_to_call(body, messages)
    if functions:
        pieces: list[tuple[dict[str, Any], int]] = []
        for k, function in enumerate(functions):
            name = str(function.get("name", ""))
            arguments = json.dumps(_schema_value(function.get("parameters") or {}))
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            calls.append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
            )
            head = {"index": k, "id": call_id, "type": "function"}
            pieces.append(
                ({"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]},
                 count_text_tokens(name))
            )  # fmt: skip
            pieces += [
                ({"tool_calls": [{"index": k, "function": {"arguments": piece}}]}, 1)
                for piece in split_tokens(arguments)
            ]
        finish = "tool_calls"
        for delta, tokens in pieces:
            if budget is not None and sum(f.tokens for f in frames) + tokens > budget:
                finish = "length"
                break
            frames.append(_Frame(delta, tokens))
            call = delta["tool_calls"][0]
            calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
        calls = calls[: len({f.delta["tool_calls"][0]["index"] for f in frames})]
        if frames:
            frames[0].delta = {"role": "assistant", "content": None, **frames[0].delta}
        return _Choice(index, frames, finish, reasoning, calls)

    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        schema = (response_format or {}).get("json_schema", {}).get("schema")
        texts = split_tokens(json.dumps(_schema_value(schema or {"type": "object"})))
    elif kind == "json_object":
        texts = split_tokens(json.dumps({"reply": "".join(reply_tokens(wanted)).strip()}))
    else:
        texts = reply_tokens(wanted, start=3 * index)
    kept = texts if budget is None else texts[:budget]
    for position, text in enumerate(kept):
        entry = _logprob(text, position, top) if logprobs else None
        frames.append(_Frame({"content": text}, 1, entry))
    if frames:
        frames[0].delta = {"role": "assistant", **frames[0].delta}
    return _Choice(index, frames, "length" if len(kept) < len(texts) else "stop", reasoning)


def _abbreviated(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_RECORDED_STRING:
        return f"<{len(value)} characters>"
    if isinstance(value, list):
        return [_abbreviated(item) for item in value]
    if isinstance(value, dict):
        return {key: _abbreviated(item) for key, item in value.items()}
    return value


def _positive_int(body: Mapping[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadRequest(f"{name} must be a positive integer")
    return value


async def chat_completions(request: Request) -> Response:
    request_id = _new_request_id()
    id_header = {HEADER_REQUEST_ID: request_id}
    if (refusal := _unauthorized(request)) is not None:
        refusal.headers.update(id_header)
        return refusal
    state = _state(request)
    try:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise _BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("you must provide a model parameter")
        if model not in state.config.models:
            return _error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
                headers=id_header,
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages must be a non-empty list")
        if not all(isinstance(m, dict) for m in messages):
            raise _BadRequest("every message must be an object")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _BadRequest("stream must be a boolean")
        cap = _output_cap(body)
        n = _positive_int(body, "n", 1)
        header_knobs = _header_knobs(request)
        prompt_knobs = _prompt_knobs(messages)
    except _BadRequest as exc:
        return _error(400, str(exc), headers=id_header)

    # Only a valid request takes its turn in the queue, so a typo in a test does not
    # silently use up a fault meant for the next call.
    knobs = _merge(header_knobs, prompt_knobs, state.next_queued(), config=state.config)
    choices = [
        _plan_choice(
            index,
            body=body,
            messages=messages,
            wanted=knobs.reply_tokens or 0,
            cap=cap,
            reasoning=knobs.reasoning_tokens or 0,
        )
        for index in range(n)
    ]
    images = count_image_parts(messages)
    record = _RequestRecord(
        request_id=request_id,
        model=model,
        stream=stream,
        fault=knobs.fault,
        prompt_tokens=count_prompt_tokens(
            messages, tools=body.get("tools"), response_format=body.get("response_format")
        )
        + images * FAKE_IMAGE_TOKENS,
        completion_tokens=sum(c.completion_tokens for c in choices),
        reasoning_tokens=sum(c.reasoning_tokens for c in choices),
        images=images,
        body=_abbreviated(body),
    )
    state.chat_requests += 1
    state.records.append(record)

    fault = knobs.fault or ""
    if (failed := await _fault_response(request, fault, id_header)) is not None:
        return failed

    if await _wait_unless_disconnected(request, (knobs.latency_ms or 0) / 1000):
        return Response(status_code=499, headers=id_header)  # nobody is listening any more
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    tps = knobs.tokens_per_second or 0.0

    if stream:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        frames = _stream_frames(
            record=record,
            completion_id=completion_id,
            created=created,
            choices=choices,
            include_usage=include_usage,
            tokens_per_second=tps,
            fault=fault,
        )
        return _EventStream(frames, headers=id_header)

    # A real upstream takes as long to answer in one piece as it would to stream.
    longest = max(len(c.frames) for c in choices)
    pace = (longest - 1) / tps if tps > 0 and longest else 0.0
    if await _wait_unless_disconnected(request, pace):
        return Response(status_code=499, headers=id_header)
    completion = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [_whole_choice(choice, body) for choice in choices],
        "usage": _usage(record.prompt_tokens, record.completion_tokens, record.reasoning_tokens),
    }
    if fault.startswith(("cut", "malformed")):
        # The client gets no usable reply, so none of its tokens count as sent.
        encoded = json.dumps(completion).encode()
        broken = encoded[: len(encoded) // 2] if fault.startswith("cut") else b"{not json"
        return Response(broken, media_type="application/json", headers=id_header)
    record.tokens_sent = sum(frame.tokens for c in choices for frame in c.frames)
    record.completed = True
    return JSONResponse(completion, headers=id_header)


async def _fault_response(
    request: Request, fault: str, id_header: Mapping[str, str]
) -> Response | None:
    """The answer to a 500, 429 or timeout fault; None for any other."""
    if fault == "500":
        return _error(
            500,
            "The server had an error while processing your request.",
            type_="server_error",
            headers=id_header,
        )
    if fault == "429":
        return _error(
            429,
            "Rate limit reached for requests (fake upstream).",
            type_="requests",
            code="rate_limit_exceeded",
            headers={**id_header, "retry-after": "1"},
        )
    if fault == "timeout":
        await _wait_unless_disconnected(request, TIMEOUT_FAULT_SECONDS)
        # Only seen by a client patient enough to wait the whole time.
        return _error(
            504, "The fake upstream hung (timeout fault).", type_="timeout", headers=id_header
        )
    return None


def _whole_choice(choice: _Choice, body: Mapping[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if choice.tool_calls else choice.content,
        "refusal": None,
    }
    if choice.tool_calls:
        message["tool_calls"] = choice.tool_calls
    logprobs = None
    if body.get("logprobs") is True:
        logprobs = {
            "content": [f.logprob for f in choice.frames if f.logprob is not None],
            "refusal": None,
        }
    return {
        "index": choice.index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
    }


async def _stream_frames(
    *,
    record: _RequestRecord,
    completion_id: str,
    created: int,
    choices: Sequence[_Choice],
    include_usage: bool,
    tokens_per_second: float,
    fault: str,
) -> AsyncGenerator[bytes, None]:
    """The SSE events of one streamed reply; updates `record` as the client is served. The
    choices advance together, one piece each per step, as a batched model's would."""

    def chunk(index: int, delta: Mapping[str, Any], finish: str | None, logprob: Any) -> bytes:
        logprobs = {"content": [logprob], "refusal": None} if logprob is not None else None
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": record.model,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                ],
            }
        )

    stop_after: int | None = None
    if fault.startswith("cut"):
        stop_after = _fault_count(fault, DEFAULT_CUT_TOKENS)
    elif fault.startswith("malformed"):
        stop_after = _fault_count(fault, DEFAULT_MALFORMED_TOKENS)

    sent = 0
    steps = max((len(c.frames) for c in choices), default=0)
    for step in range(steps):
        if step and tokens_per_second > 0:
            await anyio.sleep(1 / tokens_per_second)
        for choice in choices:
            if step >= len(choice.frames) or (stop_after is not None and sent >= stop_after):
                continue
            frame = choice.frames[step]
            yield chunk(choice.index, frame.delta, None, frame.logprob)
            # Counted once the frame has been handed to the server, so a client that leaves
            # mid-stream leaves the true count behind.
            record.tokens_sent += frame.tokens
            sent += 1

    if fault.startswith("cut"):
        raise _DropConnection
    if fault.startswith("malformed"):
        yield b"data: {not json\n\n"
        return
    for choice in choices:
        yield chunk(
            choice.index, {"role": "assistant"} if not choice.frames else {},
            choice.finish_reason, None,
        )  # fmt: skip
    if include_usage:
        yield _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": record.model,
                "choices": [],
                "usage": _usage(
                    record.prompt_tokens, record.completion_tokens, record.reasoning_tokens
                ),
            }
        )
    yield b"data: [DONE]\n\n"
    record.completed = True


# ---- embeddings ----------------------------------------------------------------------------


def _embedding_inputs(raw: Any) -> list[str | list[int]]:
    def token_ids(value: Any) -> bool:
        return (
            isinstance(value, list)
            and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
        )

    if isinstance(raw, str) and raw:
        return [raw]
    if token_ids(raw):
        return [raw]
    if (
        isinstance(raw, list)
        and raw
        and all((isinstance(item, str) and item) or token_ids(item) for item in raw)
    ):
        return list(raw)
    raise _BadRequest("input must be a non-empty string, list of strings or token ids")


def _vector(item: str | list[int], dimensions: int) -> list[float]:
    """A unit vector that depends only on the input."""
    seed = item if isinstance(item, str) else ",".join(map(str, item))
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{counter}:{seed}".encode()).digest()
        values += [(byte - 127.5) / 127.5 for byte in digest]
        counter += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


async def embeddings(request: Request) -> Response:
    request_id = _new_request_id()
    id_header = {HEADER_REQUEST_ID: request_id}
    if (refusal := _unauthorized(request)) is not None:
        refusal.headers.update(id_header)
        return refusal
    state = _state(request)
    try:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise _BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or model not in state.config.models:
            return _error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
                headers=id_header,
            )
        inputs = _embedding_inputs(body.get("input"))
        dimensions = _positive_int(body, "dimensions", EMBEDDING_DIMENSIONS)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _BadRequest("encoding_format must be float or base64")
        header_knobs = _header_knobs(request)
    except _BadRequest as exc:
        return _error(400, str(exc), headers=id_header)
    knobs = _merge(header_knobs, state.next_queued(), config=state.config)
    tokens = sum(count_text_tokens(i) if isinstance(i, str) else len(i) for i in inputs)
    record = _RequestRecord(
        request_id=request_id,
        model=model,
        stream=False,
        fault=knobs.fault,
        prompt_tokens=tokens,
        endpoint="embeddings",
        body=_abbreviated(body),
    )
    state.records.append(record)
    fault = knobs.fault or ""
    if (failed := await _fault_response(request, fault, id_header)) is not None:
        return failed
    if await _wait_unless_disconnected(request, (knobs.latency_ms or 0) / 1000):
        return Response(status_code=499, headers=id_header)
    if fault.startswith(("cut", "malformed")):
        return Response(b'{"object": "list", "da', media_type="application/json", headers=id_header)
    data = []
    for index, item in enumerate(inputs):
        vector = _vector(item, dimensions)
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    record.completed = True
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers=id_header,
    )


async def queue_next(request: Request) -> Response:
    state = _state(request)
    try:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise _BadRequest("the request body must be a JSON object")
        unknown = set(body) - {
            "fault", "reply_tokens", "latency_ms", "tokens_per_second", "reasoning_tokens",
            "count",
        }  # fmt: skip
        if unknown:
            raise _BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
        fault = body.get("fault")
        if fault is not None and not isinstance(fault, str):
            raise _BadRequest("fault must be a string or null")
        count = _non_negative_int(body.get("count", 1), "count")
        if not count:
            raise _BadRequest("count must be at least 1")
        knobs = _Knobs(
            fault=_parse_fault(fault) if fault is not None else None,
            reply_tokens=_non_negative_int(body.get("reply_tokens"), "reply_tokens"),
            latency_ms=_non_negative_int(body.get("latency_ms"), "latency_ms"),
            tokens_per_second=_non_negative_number(
                body.get("tokens_per_second"), "tokens_per_second"
            ),
            reasoning_tokens=_non_negative_int(body.get("reasoning_tokens"), "reasoning_tokens"),
        )
    except _BadRequest as exc:
        return _error(400, str(exc))
    state.queue.append(_QueuedKnobs(knobs=knobs, remaining=count))
    return JSONResponse({"queued": count, "pending": sum(q.remaining for q in state.queue)})


async def reset(request: Request) -> Response:
    state = _state(request)
    state.queue.clear()
    state.records.clear()
    state.chat_requests = 0
    return JSONResponse({"reset": True})


async def stats(request: Request) -> Response:
    state = _state(request)
    return JSONResponse(
        {
            "chat_requests": state.chat_requests,
            "requests": [asdict(record) for record in state.records],
        }
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    # Unknown routes and wrong methods get OpenAI's error shape too, not plain text.
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal server error"
    return _error(status, str(detail))


def build_app(config: FakeUpstreamConfig) -> Starlette:
    if not config.models:
        raise ValueError("the fake upstream needs at least one model")
    app = Starlette(
        routes=[
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/_fake/next", queue_next, methods=["POST"]),
            Route("/_fake/reset", reset, methods=["POST"]),
            Route("/_fake/stats", stats, methods=["GET"]),
        ],
        middleware=[Middleware(_RequestIdMiddleware)],
        exception_handlers={HTTPException: _http_error},
    )
    # On the app, not in a module global, so two apps in one process keep apart.
    app.state.fake_upstream = _FakeState(config=config)
    return app


def _parse_args(argv: list[str] | None) -> FakeUpstreamConfig:
    parser = argparse.ArgumentParser(
        prog="python -m aicredits.devtools.fake_upstream",
        description="Serve a fake OpenAI-compatible chat upstream.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9500)
    parser.add_argument("--latency-ms", type=int, default=0, help="delay before the first byte")
    parser.add_argument(
        "--tokens-per-second", type=float, default=0.0, help="reply pace; 0 means unlimited"
    )
    parser.add_argument("--reply-tokens", type=int, default=40, help="tokens in each reply")
    parser.add_argument("--models", default="demo-model", help="comma-separated model ids")
    parser.add_argument("--api-key", default=None, help="require this bearer key on /v1/*")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        parser.error("--models needs at least one model id")
    for name in ("latency_ms", "tokens_per_second", "reply_tokens"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    return FakeUpstreamConfig(
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        tokens_per_second=args.tokens_per_second,
        reply_tokens=args.reply_tokens,
        models=models,
        api_key=args.api_key,
    )


def main(argv: list[str] | None = None) -> int:
    config = _parse_args(argv)
    uvicorn.run(build_app(config), host=config.host, port=config.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
