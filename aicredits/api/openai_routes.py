"""The OpenAI-compatible API: `POST /v1/chat/completions`, `POST /v1/embeddings` and
`GET /v1/models`, authenticated by personal API keys and metered by the same gateway, ledger
and limits as the chat UI.

Errors use OpenAI's shape, `{"error": {"message", "type", "code"}}`, with the status the
issue asks for. A streamed reply is started only once its first token is in hand, so a
provider failure before any output is still a plain 502 rather than a broken stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from aicredits.adapters import logs
from aicredits.domain.chat import ChatRequest, parse_chat_request
from aicredits.domain.embeddings import EmbeddingRequest, parse_embedding_request
from aicredits.domain.errors import (
    AICreditsError,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidParameter,
    InvalidRequest,
    LimiterUnavailable,
    RateLimited,
    answer_for,
)
from aicredits.services import api_keys
from aicredits.services.auth import CurrentUser
from aicredits.services.catalog import list_embedding_offers, list_model_offers
from aicredits.services.embeddings import EmbeddingResult, start_embeddings
from aicredits.services.gateway import (
    Delta,
    Gateway,
    IdempotencyKeyReused,
    ReplyCut,
    ReplyInterrupted,
    ServerRestarting,
    Turn,
    TurnResult,
    UpstreamFailed,
    new_request_id,
    shared_gateway,
)
from aicredits.services.runtime import Database, database_for, run_blocking
from aicredits.services.subscriptions import PlanPastDue, QuotaExceeded
from aicredits.settings import Settings

logger = logging.getLogger(__name__)


class AuthenticationFailed(AICreditsError):
    code = "invalid_api_key"


class RequestTooLarge(AICreditsError):
    code = "request_too_large"


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    status: int
    type: str  # OpenAI's error "type"
    retry_after: str | None = None  # a fixed Retry-After header, in seconds


# What each typed error answers (its most specific class listed here wins). The message is
# the error's own, and the code its `code`.
ERROR_ANSWERS: dict[type[AICreditsError], ErrorAnswer] = {
    InsufficientCredits: ErrorAnswer(402, "insufficient_credits"),
    QuotaExceeded: ErrorAnswer(402, "quota_exceeded"),
    PlanPastDue: ErrorAnswer(402, "plan_past_due"),
    RateLimited: ErrorAnswer(429, "rate_limit_error"),  # Retry-After: the limit's own wait
    LimiterUnavailable: ErrorAnswer(503, "service_unavailable", retry_after="5"),
    AuthenticationFailed: ErrorAnswer(401, "authentication_error"),
    RequestTooLarge: ErrorAnswer(413, "invalid_request_error"),
    IdempotencyKeyReused: ErrorAnswer(409, "invalid_request_error"),
    IdempotencyConflict: ErrorAnswer(409, "invalid_request_error"),
    ServerRestarting: ErrorAnswer(503, "service_unavailable", retry_after="5"),
    UpstreamFailed: ErrorAnswer(502, "upstream_error"),
    ReplyCut: ErrorAnswer(502, "upstream_error"),
    AICreditsError: ErrorAnswer(400, "invalid_request_error"),
}


def error_body(
    exc: AICreditsError, settings: Settings
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OpenAI-shaped body and headers for one of our typed errors."""
    answer = answer_for(ERROR_ANSWERS, exc)
    body: dict[str, Any] = {"message": str(exc), "type": answer.type, "code": exc.code}
    retry_after = answer.retry_after
    if isinstance(exc, RateLimited):
        retry_after = exc.retry_after_header
    if isinstance(exc, InsufficientCredits):
        buy = f"{settings.public_url}/credits"
        body["message"] = (
            f"Insufficient credits: this request needs up to {exc.needed} credits and "
            f"{exc.available} are available. Buy more at {buy}"
        )
        body.update(needed=exc.needed, available=exc.available, buy_url=buy)
    if isinstance(exc, QuotaExceeded):
        buy = f"{settings.public_url}/credits"
        body["message"] = (
            f"Quota exceeded: your {exc.plan} plan's credits are used up until {exc.resets_on}. "
            f"Upgrade your plan or buy a pack at {buy}"
        )
        body.update(
            plan=exc.plan_id,
            resets_at=exc.resets_at.isoformat() if exc.resets_at else None,
            upgrade_url=buy,
        )
    if isinstance(exc, PlanPastDue):
        manage = f"{settings.public_url}/credits"
        body["message"] = (
            f"The last payment for your {exc.plan} plan failed, and the plan pauses usage until "
            f"it is paid. Update your card with Manage billing at {manage}"
        )
        body.update(manage_billing_url=manage)
    if isinstance(exc, InvalidParameter):
        body["param"] = exc.param
    headers = {"Retry-After": retry_after} if retry_after else {}
    return answer.status, {"error": body}, headers


CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
MODELS_PATH = "/v1/models"
API_PATHS = frozenset({CHAT_PATH, EMBEDDINGS_PATH, MODELS_PATH})


class OpenAIRoutes:
    """The routes. Their gateway (HTTP and Redis clients) is made on first use, inside the
    event loop that serves the requests, and shared with the chat page."""

    def __init__(self, settings: Settings, db: Database | None = None) -> None:
        self.settings = settings
        self._db = db

    @property
    def db(self) -> Database:
        return self._db or database_for(self.settings.database_url)

    def gateway(self) -> Gateway:
        return shared_gateway(self.settings, self.db)

    def routes(self) -> list[Route]:
        return [
            Route(CHAT_PATH, self.chat_completions, methods=["POST"]),
            Route(EMBEDDINGS_PATH, self.embeddings, methods=["POST"]),
            Route(MODELS_PATH, self.models, methods=["GET"]),
        ]

    def _error(self, exc: AICreditsError, request_id: str) -> JSONResponse:
        status, body, headers = error_body(exc, self.settings)
        return JSONResponse(
            body, status_code=status, headers={**headers, "x-request-id": request_id}
        )

    async def _user(self, request: Request) -> CurrentUser:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationFailed(
                "Missing API key: send 'Authorization: Bearer <key>'. Create a key at "
                f"{self.settings.public_url}/keys"
            )
        key = key.strip()
        # Resolved this past second in this worker: no database call, so no thread either.
        user = api_keys.cached_user(self.db, key)
        if user is None:
            user = await run_blocking(api_keys.resolve_api_key, self.db, self.settings, key)
        if user is None:
            raise AuthenticationFailed("Invalid or revoked API key.")
        logs.set_user_id(user.id)
        return user

    async def _body(self, request: Request) -> Any:
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"The request is larger than {limit} bytes.")
        raw = bytearray()
        async for chunk in request.stream():
            raw.extend(chunk)
            if len(raw) > limit:
                raise RequestTooLarge(f"The request is larger than {limit} bytes.")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest("The request body is not valid JSON.") from exc

    async def models(self, request: Request) -> Response:
        request_id = _request_id()
        try:
            await self._user(request)
        except AICreditsError as exc:
            return self._error(exc, request_id)
        offers = await run_blocking(list_model_offers, self.db, self.settings)
        embedding_offers = await run_blocking(list_embedding_offers, self.db, self.settings)
        data = []
        for offer in offers:
            spec = self.settings.model_spec(offer.id)
            data.append(
                {
                    "id": offer.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "aicredits",
                    "name": offer.label,
                    "pricing": {
                        "unit": "credits per 1K tokens",
                        "input": offer.input_per_1k,
                        "output": offer.output_per_1k,
                    },
                    "capabilities": {
                        "chat": True,
                        "vision": bool(spec and spec.vision),
                        "reasoning": bool(spec and spec.reasoning),
                    },
                }
            )
        for offer in embedding_offers:
            data.append(
                {
                    "id": offer.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "aicredits",
                    "name": offer.label,
                    "pricing": {"unit": "credits per 1K tokens", "input": offer.input_per_1k},
                    "capabilities": {"embeddings": True},
                }
            )
        return JSONResponse({"object": "list", "data": data}, headers={"x-request-id": request_id})

    async def embeddings(self, request: Request) -> Response:
        request_id = _request_id()
        try:
            user = await self._user(request)
            body = await self._body(request)
            embedding = parse_embedding_request(
                body, models=[m.id for m in self.settings.embedding_models]
            )
            logs.set_detail(f"model {embedding.model}")
            call = await start_embeddings(
                self.gateway(),
                user_id=user.id,
                request=embedding,
                ip=request.client.host if request.client else None,
                request_id=request_id,
                idempotency_key=request.headers.get("idempotency-key"),
            )
        except AICreditsError as exc:
            return self._error(exc, request_id)
        try:
            result = await call.run()
        except (UpstreamFailed, ServerRestarting) as exc:
            return self._error(exc, request_id)
        return JSONResponse(
            _embeddings(embedding, result),
            headers={"x-request-id": request_id, "x-aicredits-charged": str(result.charged)},
        )

    async def chat_completions(self, request: Request) -> Response:
        request_id = _request_id()
        try:
            user = await self._user(request)
            body = await self._body(request)
            chat = parse_chat_request(body, models=[m.id for m in self.settings.models])
            # The request's access line names the model: one line per call, after it ends.
            logs.set_detail(f"model {chat.model}")
            turn = await self.gateway().start(
                user_id=user.id,
                request=chat,
                ip=request.client.host if request.client else None,
                request_id=request_id,
                idempotency_key=request.headers.get("idempotency-key"),
            )
        except AICreditsError as exc:
            return self._error(exc, request_id)
        headers = {"x-request-id": request_id}
        if not chat.stream:
            try:
                result = await turn.run()
            except (UpstreamFailed, ServerRestarting) as exc:
                return self._error(exc, request_id)
            return JSONResponse(_completion(chat, result), headers=_charge_headers(result, headers))
        replies = turn.deltas()
        try:
            first = await anext(replies)
        except StopAsyncIteration:
            first = None
        except (UpstreamFailed, ServerRestarting) as exc:
            return self._error(exc, request_id)
        return EventStream(
            _sse(chat, turn, first, replies),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )


class EventStream(StreamingResponse):
    """A StreamingResponse without anyio's task group, which costs a streamed reply's first
    token about 0.2 ms: the events are sent from the request's own task while one plain
    asyncio task waits for the client to leave, and then cancels the sending (as
    Starlette's own does, so the turn settles for what was delivered)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending = asyncio.current_task()
        assert sending is not None
        left = False

        async def listen() -> None:
            nonlocal left
            await self.listen_for_disconnect(receive)
            left = True
            sending.cancel()

        listener = asyncio.ensure_future(listen())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not left:
                raise
            sending.uncancel()  # the client left: the response is over, not the server
        finally:
            listener.cancel()


def _request_id() -> str:
    """The id this call is known by: in the response, the logs, and as the credit hold's key.
    The one the middleware made for this request when it made it; a client's own X-Request-ID
    never keys a hold (it need not be unique), so then a fresh one replaces it in the logs."""
    request_id = logs.generated_request_id()
    if request_id is None:
        request_id = new_request_id()
        given = logs.current_request_id()
        if given is not None:
            logger.info("client request id %s is %s", given, request_id)
        logs.set_request_id(request_id)
    return request_id


def _charge_headers(result: TurnResult, headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "x-aicredits-charged": str(result.charged)}


def _extras(result: TurnResult | EmbeddingResult) -> dict[str, Any]:
    return {
        "credits_charged": result.charged,
        "balance_after": result.balance_after,
        "estimated": result.estimated,
    }


def _usage(result: TurnResult) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": result.input_tokens,
        "completion_tokens": result.output_tokens,
        "total_tokens": result.input_tokens + result.output_tokens,
    }
    if result.reasoning_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": result.reasoning_tokens}
    return usage


def _completion(chat: ChatRequest, result: TurnResult) -> dict[str, Any]:
    choices = []
    for choice in result.choices:
        message: dict[str, Any] = {
            "role": "assistant",
            # As OpenAI does: no content, rather than an empty one, beside tool calls.
            "content": choice.content if choice.content or not choice.tool_calls else None,
            "refusal": choice.refusal,
        }
        if choice.tool_calls:
            message["tool_calls"] = list(choice.tool_calls)
        choices.append(
            {
                "index": choice.index,
                "message": message,
                "logprobs": choice.logprobs,
                "finish_reason": choice.finish_reason or "stop",
            }
        )
    return {
        "id": "chatcmpl-" + result.request_id.removeprefix("req_"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": choices,
        "usage": _usage(result),
        "aicredits": _extras(result),
    }


def _embeddings(request: EmbeddingRequest, result: EmbeddingResult) -> dict[str, Any]:
    return {
        "object": "list",
        "data": result.data,
        "model": request.model,
        "usage": {"prompt_tokens": result.input_tokens, "total_tokens": result.input_tokens},
        "aicredits": _extras(result),
    }


def _chunk_choice(delta: Delta, first: bool) -> dict[str, Any]:
    """One streamed piece of one choice, passed on as the upstream sent it."""
    piece: dict[str, Any] = {"role": "assistant"} if first else {}
    if delta.text or not (delta.tool_calls or delta.refusal):
        piece["content"] = delta.text
    if delta.tool_calls:
        piece["tool_calls"] = list(delta.tool_calls)
    if delta.refusal:
        piece["refusal"] = delta.refusal
    choice: dict[str, Any] = {"index": delta.index, "delta": piece, "finish_reason": None}
    if delta.logprobs is not None:
        choice["logprobs"] = delta.logprobs
    return choice


# The events' JSON: compact, one encoder for every event.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def sse_events(base: dict[str, Any]) -> Callable[[dict[str, Any]], str]:
    """`payload` -> the event `data: {**base, **payload}` (payload's keys are not base's).
    The part of base, the same in each of a reply's events, is encoded once."""
    head = "data: " + _COMPACT.encode(base)[:-1]

    def event(payload: dict[str, Any]) -> str:
        tail = _COMPACT.encode(payload)
        return f"{head},{tail[1:]}\n\n" if len(tail) > 2 else f"{head}}}\n\n"

    return event


async def _sse(
    chat: ChatRequest, turn: Turn, first: Delta | None, rest: AsyncGenerator[Delta, None]
) -> AsyncIterator[str]:
    base = {
        "id": "chatcmpl-" + turn.request_id.removeprefix("req_"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": chat.model,
    }

    event = sse_events(base)

    started: set[int] = set()

    def delta(piece: Delta) -> str:
        first_of_choice = piece.index not in started
        started.add(piece.index)
        return event({"choices": [_chunk_choice(piece, first_of_choice)]})

    try:
        if first is not None:
            yield delta(first)
        async with contextlib.aclosing(rest):  # a client that leaves settles the turn now
            async for piece in rest:
                yield delta(piece)
    except ReplyCut as cut:
        # The stream ends with an OpenAI-shaped error event and no [DONE].
        logger.info("chat %s cut after %d tokens", turn.request_id, cut.result.output_tokens)
        kind = "server_error" if isinstance(cut, ReplyInterrupted) else "upstream_error"
        message = {
            "message": str(cut),
            "type": kind,
            "code": cut.code,
            "aicredits": _extras(cut.result),
        }
        yield f"data: {json.dumps({'error': message})}\n\n"
        return
    result = turn.result
    assert result is not None
    for choice in result.choices:
        finish = {
            "index": choice.index,
            "delta": {},
            "finish_reason": choice.finish_reason or "stop",
        }
        yield event({"choices": [finish]})
    if chat.include_usage:
        yield event({"choices": [], "usage": _usage(result), "aicredits": _extras(result)})
    yield "data: [DONE]\n\n"
