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
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp
import certifi
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
    # Every generated token, reasoning tokens included.
    output_tokens: int
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of one choice of the reply: its text, and whatever else the provider sent
    with it (tool-call pieces, a refusal, log probabilities), as the provider sent it."""

    text: str
    index: int = 0
    tool_calls: tuple[dict[str, Any], ...] = ()
    refusal: str = ""
    logprobs: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    usage: Usage | None
    # Choice 0's, and every choice's by index.
    finish_reason: str | None
    finish_reasons: Mapping[int, str] = field(default_factory=dict)


def normalise_usage(raw: Any) -> Usage | None:
    """Token counts from a usage object, whichever field names the provider uses.

    Reasoning tokens are output: OpenAI counts them in completion_tokens; a provider that
    leaves them out of it still counts them in total_tokens, so the larger figure is used."""
    if raw is None:
        return None
    data = raw if isinstance(raw, dict) else getattr(raw, "model_dump", lambda: {})()
    if not isinstance(data, dict):
        return None
    prompt = data.get("prompt_tokens", data.get("input_tokens"))
    completion = data.get("completion_tokens", data.get("output_tokens"))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    prompt, completion = max(prompt, 0), max(completion, 0)
    total = data.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool):
        completion = max(completion, total - prompt)
    details = data.get("completion_tokens_details", data.get("output_tokens_details"))
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return Usage(
        input_tokens=prompt,
        output_tokens=completion,
        reasoning_tokens=reasoning if isinstance(reasoning, int) and reasoning > 0 else 0,
    )


def _choice_delta(choice: Any) -> tuple[int, str | None, Delta | None]:
    """One choice of a streamed event: its index, its finish reason, and its piece of the
    reply (None when it carries nothing but a role). Raises ValueError when malformed."""
    if not isinstance(choice, dict):
        raise ValueError("a choice that is not an object")
    index = choice.get("index") or 0
    delta = choice.get("delta") or {}
    if not isinstance(index, int) or not isinstance(delta, dict):
        raise ValueError("a choice without an index or a delta")
    reason = choice.get("finish_reason") or None
    text = delta.get("content") or ""
    calls = delta.get("tool_calls") or []
    refusal = delta.get("refusal") or ""
    logprobs = choice.get("logprobs") or None
    if not isinstance(text, str) or not isinstance(refusal, str):
        raise ValueError("content that is not text")
    if calls or refusal or logprobs:
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise ValueError("tool calls that are not a list of objects")
        if logprobs is not None and not isinstance(logprobs, dict):
            raise ValueError("logprobs that are not an object")
        return index, reason, Delta(text, index, tuple(calls), refusal, logprobs)
    if text:
        return index, reason, Delta(text, index)
    return index, reason, None


def _message_delta(choice: Any) -> tuple[int, str | None, Delta]:
    """A whole (not streamed) choice as one piece, its tool calls numbered as in a stream."""
    index = choice.get("index") or 0
    message = choice["message"]
    calls = [{**call, "index": k} for k, call in enumerate(message.get("tool_calls") or ())]
    delta = Delta(
        message.get("content") or "",
        index,
        tuple(calls),
        message.get("refusal") or "",
        choice.get("logprobs") or None,
    )
    if not isinstance(index, int) or not isinstance(delta.text, str):
        raise ValueError("a malformed choice")
    return index, choice.get("finish_reason") or None, delta


class _StatusError(Exception):
    """The upstream answered a chat request with an error status (our own HTTP client)."""

    def __init__(self, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(f"status {status}")
        self.status_code = status
        self.headers = headers


def env_proxy(url: str) -> str | None:
    """The proxy that HTTP_PROXY, HTTPS_PROXY and NO_PROXY give for `url`, as the SDK and
    httpx honour them; None for none."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme) or None


def _retry_after(headers: Mapping[str, str] | None, attempt: int) -> float:
    header = headers.get("retry-after") if headers is not None else None
    try:
        wait = float(header) if header else 0.0
    except ValueError:
        wait = 0.0
    backoff = 0.25 * (2**attempt) * (1 + random.random() / 4)  # noqa: S311 - jitter only
    return min(max(wait, backoff), MAX_RETRY_WAIT)


# A certificate the provider's address does not prove is not cured by asking again.
_NOT_RETRIED = (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)


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
        timeout = httpx2.Timeout(read_timeout, connect=connect_timeout)
        key = api_key or "no-key-needed"  # the local fake upstream takes any key
        # Embeddings and the model list go through the SDK.
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=key,
            max_retries=0,  # retried here, and only before the first token
            timeout=timeout,
        )
        # Chat, the metered hot path, is one plain HTTP client: the request body is ours
        # already (checked by the gateway) and the reply is decoded here, so the SDK's typing
        # and transforms of every request would only cost time. Same wire as the SDK's:
        # POST {base_url}/chat/completions, a Bearer key, a JSON body with extra_body's
        # fields merged over ours. It is aiohttp (a C HTTP parser): against the local fake
        # upstream a whole call takes 1.0 ms here, 1.5 ms through httpx (docs/performance.md).
        self._chat_url = base_url.rstrip("/") + "/chat/completions"
        self._chat_headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        # No total: a reply may stream for up to max_seconds, checked as it streams.
        self._chat_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._proxy = env_proxy(self._chat_url)
        self._session: aiohttp.ClientSession | None = None

    def _chat_session(self) -> aiohttp.ClientSession:
        """The chat client, made on first use inside the event loop that serves the calls."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=1000,
                limit_per_host=0,
                # As httpx and the SDK verify: against certifi's roots.
                ssl=ssl.create_default_context(cafile=certifi.where()),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._chat_headers,
                timeout=self._chat_timeout,
                # Not trust_env: it looks the proxy up again on every request (0.6 ms).
                auto_decompress=True,
                # No cookies kept: every user's calls share this client, and a cookie the
                # provider's edge sets on one user's reply must not ride along on the next
                # user's call. The key is the only credential.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self._client.close()

    async def _call(self, request_id: str, make: Callable[[], Awaitable[T]]) -> T:
        """Make the request, retrying 429, 5xx and a lost connection (before any output
        exists) with backoff."""
        attempt = 0
        while True:
            try:
                return await make()
            except (openai.APIStatusError, _StatusError) as error:
                retryable = error.status_code == 429 or error.status_code >= 500
                if not retryable or attempt >= self.retries:
                    raise UpstreamError(
                        f"the model provider answered {error.status_code}",
                        kind="status",
                        status=error.status_code,
                    ) from error
                headers = (
                    error.headers
                    if isinstance(error, _StatusError)
                    else (error.response.headers if error.response is not None else None)
                )
                wait = _retry_after(headers, attempt)
                logger.info(
                    "upstream %s for %s, retry %d in %.2fs",
                    error.status_code,
                    request_id,
                    attempt + 1,
                    wait,
                )
                await asyncio.sleep(wait)
                attempt += 1
            except (openai.APITimeoutError, TimeoutError) as error:
                # (aiohttp's timeouts are TimeoutErrors, some of them ClientErrors too.)
                raise UpstreamError("the model provider timed out", kind="timeout") from error
            except (openai.APIConnectionError, aiohttp.ClientConnectionError) as error:
                # Retried like a 5xx: nothing has reached the caller yet. The common case is
                # a kept-alive connection the provider closed (its idle timeout) just as this
                # request went out on it: a reset, or a disconnect with no answer. A fresh
                # connection is the cure, so the first retry goes at once; the pool has by
                # then heard of any other connection the provider closed. A connection that
                # could not be opened at all waits like a 5xx. (As the openai SDK retries.)
                if attempt >= self.retries or isinstance(error, _NOT_RETRIED):
                    raise UpstreamError(
                        "the model provider could not be reached", kind="connection"
                    ) from error
                refused = isinstance(error, aiohttp.ClientConnectorError)
                wait = _retry_after(None, attempt) if refused or attempt else 0.0
                logger.info(
                    "upstream connection failed for %s (%s), retry %d in %.2fs",
                    request_id,
                    type(error).__name__,
                    attempt + 1,
                    wait,
                )
                await asyncio.sleep(wait)
                attempt += 1
            except aiohttp.ClientError as error:
                raise UpstreamError(
                    "the model provider could not be reached", kind="connection"
                ) from error

    def _chat_body(self, arguments: dict[str, Any], *, stream: bool) -> bytes:
        body: dict[str, Any] = {
            "model": arguments["model"],
            "messages": arguments["messages"],
            arguments["cap_field"]: arguments["max_tokens"],
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(arguments["params"])  # as the SDK merges extra_body: over ours
        return json.dumps(body, separators=(",", ":")).encode()

    async def _open_chat(
        self, arguments: dict[str, Any], *, stream: bool
    ) -> aiohttp.ClientResponse:
        """Send one chat request (a fresh one per attempt); raise _StatusError on an error
        status, with the response read and released."""
        response = await self._chat_session().post(
            self._chat_url,
            data=self._chat_body(arguments, stream=stream),
            headers=arguments["headers"],
            allow_redirects=False,
            proxy=self._proxy,
        )
        if response.status >= 400:
            try:
                await response.read()
            finally:
                response.release()
            raise _StatusError(response.status, response.headers)
        return response

    def _arguments(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        max_tokens: int,
        request_id: str,
        params: dict[str, Any] | None,
        headers: dict[str, str] | None,
        cap_field: str,
    ) -> dict[str, Any]:
        return {
            "model": model,
            "messages": list(messages),
            "cap_field": cap_field,
            "max_tokens": max_tokens,
            "headers": {"X-Request-Id": request_id, **(headers or {})},
            # As checked by the gateway, sent as they are.
            "params": dict(params or {}),
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
        cap_field: str = "max_tokens",
    ) -> tuple[list[Delta], Finished]:
        """The whole reply, not streamed: for callers that deliver nothing until the end.
        Each choice comes as one Delta."""
        arguments = self._arguments(
            model, messages, max_tokens, request_id, params, headers, cap_field
        )

        async def send() -> bytes:
            response = await self._open_chat(arguments, stream=False)
            try:
                return await response.read()
            finally:
                response.release()

        content = await self._call(request_id, send)
        try:
            body = json.loads(content)
            choices = [_message_delta(choice) for choice in body["choices"]]
            if not choices:
                raise ValueError("no choices")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
            raise UpstreamError(MALFORMED, kind="malformed") from error
        reasons = {index: reason for index, reason, _ in choices if reason}
        return [delta for _, _, delta in choices], Finished(
            usage=normalise_usage(body.get("usage")),
            finish_reason=reasons.get(0),
            finish_reasons=reasons,
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
        cap_field: str = "max_tokens",
    ) -> AsyncIterator[Delta | Finished]:
        """Deltas as they arrive, then one Finished. Raises UpstreamError.

        The server-sent events are read and decoded here rather than as SDK objects: one
        model object per token costs more than the rest of the gateway put together.
        """
        started = time.monotonic()
        arguments = self._arguments(
            model, messages, max_tokens, request_id, params, headers, cap_field
        )
        # A fresh request per attempt: a retry cannot reuse the first one.
        response = await self._call(request_id, lambda: self._open_chat(arguments, stream=True))
        usage: Usage | None = None
        reasons: dict[int, str] = {}
        done = False
        try:
            async for line in _lines(response):
                if done:
                    # Read on to the body's end (right after [DONE]), so the connection goes
                    # back to the pool instead of being closed and opened again next call.
                    if time.monotonic() - started > self.max_seconds:
                        break
                    continue
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                if time.monotonic() - started > self.max_seconds:
                    raise UpstreamError("the reply took too long", kind="deadline")
                event = json.loads(data)
                if not isinstance(event, dict):
                    raise ValueError("an event that is not an object")
                if "error" in event:
                    raise UpstreamError(BROKE_OFF, kind="connection")
                usage = normalise_usage(event.get("usage")) or usage
                for choice in event.get("choices") or ():
                    index, reason, delta = _choice_delta(choice)
                    if reason:
                        reasons[index] = reason
                    if delta is not None:
                        yield delta
        except UpstreamError:
            raise
        except (aiohttp.ClientError, TimeoutError) as error:
            if not done:  # after [DONE] the reply is whole: a broken tail changes nothing
                raise UpstreamError(BROKE_OFF, kind="connection") from error
        except (ValueError, TypeError, AttributeError) as error:
            raise UpstreamError(MALFORMED, kind="malformed") from error
        finally:
            if done:
                response.release()  # read to its end: the connection is reused
            else:
                response.close()  # cut short: the connection cannot be
        yield Finished(usage=usage, finish_reason=reasons.get(0), finish_reasons=reasons)

    async def embed(
        self,
        *,
        model: str,
        inputs: str | list[Any],
        encoding_format: str,
        request_id: str,
        params: dict[str, Any] | None = None,
    ) -> tuple[list[dict[str, Any]], Usage | None]:
        """Embeddings of `inputs`, as the provider sent them, and the usage."""
        embeddings: Any = self._client.embeddings
        raw = await self._call(
            request_id,
            lambda: embeddings.with_raw_response.create(
                model=model,
                input=inputs,
                # Always given, so the SDK neither swaps in base64 nor decodes it.
                encoding_format=encoding_format,
                extra_headers={"X-Request-Id": request_id},
                extra_body=dict(params or {}),
            ),
        )
        try:
            body = json.loads(raw.http_response.content)
            data = body["data"]
            if not isinstance(data, list) or not all(
                isinstance(item, dict) and "embedding" in item for item in data
            ):
                raise ValueError("no embeddings")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise UpstreamError(MALFORMED, kind="malformed") from error
        usage = body.get("usage")
        tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if not isinstance(tokens, int) or isinstance(tokens, bool):
            return data, None
        return data, Usage(input_tokens=max(tokens, 0), output_tokens=0)

    async def model_ids(self) -> list[str]:
        page = await self._client.models.list()
        return [m.id for m in page.data]


async def _lines(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body's lines, however long (a server-sent event is one line), without their
    line ends. The last one need not end with one."""
    rest = b""
    async for chunk in response.content.iter_any():
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line.rstrip(b"\r")
    if rest:
        yield rest.rstrip(b"\r")
