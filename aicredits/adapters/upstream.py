"""The model provider: the one place that talks to an OpenAI-compatible upstream.

It always streams, with usage requested, so streaming and non-streaming callers share one
path and a cut stream still has every delivered token accounted for. Retries (429 and 5xx,
with backoff) happen only before the first token: after that a retry would generate, and
bill, a different reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx2
import openai

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_RETRY_WAIT = 4.0
BROKE_OFF = "the model provider's stream broke off"
MALFORMED = "the model provider sent a malformed event"
ErrorKind = Literal["status", "timeout", "connection", "malformed", "deadline"]


class UpstreamError(Exception):
    """The upstream failed. `kind` says how; `status` is its HTTP status when it sent one."""

    def __init__(self, message: str, *, kind: ErrorKind, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    usage: Usage | None
    finish_reason: str | None


def normalise_usage(raw: Any) -> Usage | None:
    """Token counts from a usage object, whichever field names the provider uses."""
    if raw is None:
        return None
    data = raw if isinstance(raw, dict) else getattr(raw, "model_dump", lambda: {})()
    if not isinstance(data, dict):
        return None
    prompt = data.get("prompt_tokens", data.get("input_tokens"))
    completion = data.get("completion_tokens", data.get("output_tokens"))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(input_tokens=max(prompt, 0), output_tokens=max(completion, 0))


def _retry_after(error: openai.APIStatusError, attempt: int) -> float:
    header = error.response.headers.get("retry-after") if error.response is not None else None
    try:
        wait = float(header) if header else 0.0
    except ValueError:
        wait = 0.0
    backoff = 0.25 * (2**attempt) * (1 + random.random() / 4)  # noqa: S311 - jitter only
    return min(max(wait, backoff), MAX_RETRY_WAIT)


class Upstream:
    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        connect_timeout: float,
        read_timeout: float,
        retries: int,
        max_seconds: float,
    ) -> None:
        self.base_url = base_url
        self.retries = retries
        self.max_seconds = max_seconds
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "no-key-needed",  # the local fake upstream takes any key
            max_retries=0,  # retried here, and only before the first token
            timeout=httpx2.Timeout(read_timeout, connect=connect_timeout),
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def _call(self, request_id: str, make: Callable[[], Awaitable[T]]) -> T:
        """Make the request, retrying 429 and 5xx (before any output exists) with backoff."""
        attempt = 0
        while True:
            try:
                return await make()
            except openai.APIStatusError as error:
                retryable = error.status_code == 429 or error.status_code >= 500
                if not retryable or attempt >= self.retries:
                    raise UpstreamError(
                        f"the model provider answered {error.status_code}",
                        kind="status",
                        status=error.status_code,
                    ) from error
                wait = _retry_after(error, attempt)
                logger.info(
                    "upstream %s for %s, retry %d in %.2fs",
                    error.status_code,
                    request_id,
                    attempt + 1,
                    wait,
                )
                await asyncio.sleep(wait)
                attempt += 1
            except openai.APITimeoutError as error:
                raise UpstreamError("the model provider timed out", kind="timeout") from error
            except openai.APIConnectionError as error:
                raise UpstreamError(
                    "the model provider could not be reached", kind="connection"
                ) from error

    def _arguments(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        max_tokens: int,
        request_id: str,
        params: dict[str, Any] | None,
        headers: dict[str, str] | None,
    ) -> dict[str, Any]:
        return {
            "model": model,
            "messages": list(messages),
            "max_tokens": max_tokens,
            "extra_headers": {"X-Request-Id": request_id, **(headers or {})},
            **(params or {}),
        }

    async def complete(
        self,
        *,
        model: str,
        messages: Sequence[dict[str, Any]],
        max_tokens: int,
        request_id: str,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[str, Finished]:
        """One whole reply, not streamed: for callers that deliver nothing until the end."""
        arguments = self._arguments(model, messages, max_tokens, request_id, params, headers)
        completions: Any = self._client.chat.completions
        raw = await self._call(
            request_id, lambda: completions.with_raw_response.create(stream=False, **arguments)
        )
        try:
            body = json.loads(raw.http_response.content)
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
            raise UpstreamError(MALFORMED, kind="malformed") from error
        return text, Finished(
            usage=normalise_usage(body.get("usage")), finish_reason=choice.get("finish_reason")
        )

    async def stream(
        self,
        *,
        model: str,
        messages: Sequence[dict[str, Any]],
        max_tokens: int,
        request_id: str,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> AsyncIterator[Delta | Finished]:
        """Text deltas as they arrive, then one Finished. Raises UpstreamError.

        The server-sent events are read and decoded here rather than as SDK objects: one
        model object per token costs more than the rest of the gateway put together.
        """
        started = time.monotonic()
        arguments = self._arguments(model, messages, max_tokens, request_id, params, headers)
        completions: Any = self._client.chat.completions
        opened: list[Any] = []

        async def open_stream() -> Any:
            # A fresh request per attempt: a retry cannot reuse the first one.
            manager = completions.with_streaming_response.create(
                stream=True, stream_options={"include_usage": True}, **arguments
            )
            response = await manager.__aenter__()
            opened.append(manager)
            return response

        response = await self._call(request_id, open_stream)
        usage: Usage | None = None
        finish_reason: str | None = None
        try:
            async for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                if time.monotonic() - started > self.max_seconds:
                    raise UpstreamError("the reply took too long", kind="deadline")
                event = json.loads(data)
                if not isinstance(event, dict):
                    raise ValueError("an event that is not an object")
                if "error" in event:
                    raise UpstreamError(BROKE_OFF, kind="connection")
                usage = normalise_usage(event.get("usage")) or usage
                for choice in event.get("choices") or ():
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield Delta(text)
        except UpstreamError:
            raise
        except (openai.APIError, httpx2.HTTPError) as error:
            raise UpstreamError(BROKE_OFF, kind="connection") from error
        except (ValueError, TypeError, AttributeError) as error:
            raise UpstreamError(MALFORMED, kind="malformed") from error
        finally:
            await opened[-1].__aexit__(None, None, None)
        yield Finished(usage=usage, finish_reason=finish_reason)

    async def model_ids(self) -> list[str]:
        page = await self._client.models.list()
        return [m.id for m in page.data]
