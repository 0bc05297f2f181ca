"""A fake OpenAI-compatible chat upstream, for development, tests and benchmarks.

It answers `GET /v1/models` and `POST /v1/chat/completions` (streaming or not) with a
deterministic reply whose token count is known exactly under the project's tokenizer, so
tests can check metering to the token without a real model or network. It can be slowed
down (latency before the first byte, a tokens-per-second pace) and told to fail the way
real upstreams do (500, 429, hanging, a stream cut mid-way, a malformed event).

Run it with `python -m aicredits.devtools.fake_upstream --port 9500` and point the app at
`http://127.0.0.1:9500/v1`. Per-request behaviour comes from `X-Fake-*` request headers, from
markers in the prompt such as `[fake fault=cut:3]` or `[fake tokens-per-second=5]` (for
callers that cannot set headers: the chat page, or the app's own /v1 API in front of this),
or from a queue filled with `POST /_fake/next`, in that order of precedence; `GET
/_fake/stats` reports what each chat request was sent, and `POST /_fake/reset` clears the
queue and the stats.
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import re
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

from aicredits.adapters.tokenizer import count_message_tokens, count_text_tokens

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

HEADER_FAULT = "x-fake-fault"
HEADER_REPLY_TOKENS = "x-fake-reply-tokens"
HEADER_LATENCY_MS = "x-fake-latency-ms"
HEADER_TOKENS_PER_SECOND = "x-fake-tokens-per-second"
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


def reply_tokens(n: int) -> list[str]:
    """The first `n` tokens of the fake reply; the reply text is their concatenation."""
    return [REPLY_WORDS[i % len(REPLY_WORDS)] for i in range(n)]


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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


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
    )


_PROMPT_MARKER = re.compile(r"\[fake ([a-z-]+)=([^\]\s]+)\]")


def _prompt_knobs(messages: Sequence[Mapping[str, Any]]) -> _Knobs:
    """Knobs from `[fake name=value]` markers in the last message's text (earlier turns of a
    conversation repeat their markers, which must not apply again); the last one wins."""
    knobs = _Knobs()
    for message in messages[-1:]:
        content = message.get("content")
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
        header_knobs = _header_knobs(request)
        prompt_knobs = _prompt_knobs(messages)
    except _BadRequest as exc:
        return _error(400, str(exc), headers=id_header)

    # Only a valid request takes its turn in the queue, so a typo in a test does not
    # silently use up a fault meant for the next call.
    knobs = _merge(header_knobs, prompt_knobs, state.next_queued(), config=state.config)
    wanted = knobs.reply_tokens or 0
    tokens = reply_tokens(wanted if cap is None else min(wanted, cap))
    finish_reason = "length" if cap is not None and cap < wanted else "stop"
    record = _RequestRecord(
        request_id=request_id,
        model=model,
        stream=stream,
        fault=knobs.fault,
        prompt_tokens=count_message_tokens(messages),
    )
    state.chat_requests += 1
    state.records.append(record)

    fault = knobs.fault or ""
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
            tokens=tokens,
            finish_reason=finish_reason,
            include_usage=include_usage,
            tokens_per_second=tps,
            fault=fault,
        )
        return _EventStream(frames, headers=id_header)

    # A real upstream takes as long to answer in one piece as it would to stream.
    pace = (len(tokens) - 1) / tps if tps > 0 and tokens else 0.0
    if await _wait_unless_disconnected(request, pace):
        return Response(status_code=499, headers=id_header)
    text = "".join(tokens)
    completion = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": _usage(record.prompt_tokens, len(tokens)),
    }
    if fault.startswith(("cut", "malformed")):
        # The client gets no usable reply, so none of its tokens count as sent.
        encoded = json.dumps(completion).encode()
        broken = encoded[: len(encoded) // 2] if fault.startswith("cut") else b"{not json"
        return Response(broken, media_type="application/json", headers=id_header)
    record.tokens_sent = len(tokens)
    record.completed = True
    return JSONResponse(completion, headers=id_header)


async def _stream_frames(
    *,
    record: _RequestRecord,
    completion_id: str,
    created: int,
    tokens: Sequence[str],
    finish_reason: str,
    include_usage: bool,
    tokens_per_second: float,
    fault: str,
) -> AsyncGenerator[bytes, None]:
    """The SSE events of one streamed reply; updates `record` as the client is served."""

    def chunk(delta: Mapping[str, Any], finish: str | None) -> bytes:
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": record.model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
        )

    stop_after = len(tokens)
    if fault.startswith("cut"):
        stop_after = _fault_count(fault, DEFAULT_CUT_TOKENS)
    elif fault.startswith("malformed"):
        stop_after = _fault_count(fault, DEFAULT_MALFORMED_TOKENS)

    for i, token in enumerate(tokens[:stop_after]):
        if i and tokens_per_second > 0:
            await anyio.sleep(1 / tokens_per_second)
        yield chunk({"role": "assistant", "content": token} if i == 0 else {"content": token}, None)
        # Counted once the frame has been handed to the server, so a client that leaves
        # mid-stream leaves the true count behind.
        record.tokens_sent += 1

    if fault.startswith("cut"):
        raise _DropConnection
    if fault.startswith("malformed"):
        yield b"data: {not json\n\n"
        return
    yield chunk({"role": "assistant"} if not tokens else {}, finish_reason)
    if include_usage:
        yield _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": record.model,
                "choices": [],
                "usage": _usage(record.prompt_tokens, len(tokens)),
            }
        )
    yield b"data: [DONE]\n\n"
    record.completed = True


async def queue_next(request: Request) -> Response:
    state = _state(request)
    try:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise _BadRequest("the request body must be a JSON object")
        unknown = set(body) - {"fault", "reply_tokens", "latency_ms", "tokens_per_second", "count"}
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
