"""The chat client to the model provider (adapters.upstream, on aiohttp) against the fake
upstream over real HTTP: each way a call can fail reaches the gateway as the right kind,
with the message the user is shown, and a reply read to its end reuses its connection."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from aicredits.adapters.upstream import Delta, Finished, Upstream, UpstreamError
from aicredits.devtools.fake_upstream import FakeUpstreamConfig
from aicredits.devtools.fake_upstream import build_app as build_fake_upstream
from tests.servers import serve_asgi

MESSAGES = [{"role": "user", "content": "Say something short."}]


# The client ports the fake was called from: one port, one connection.
PORTS: list[int] = []
# The Cookie header of each call the fake was sent (b"" without one).
COOKIES: list[bytes] = []


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    inner = build_fake_upstream(FakeUpstreamConfig(reply_tokens=12))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("client"):
            PORTS.append(scope["client"][1])
            COOKIES.append(dict(scope["headers"]).get(b"cookie", b""))

        async def send_with_cookie(message: Any) -> None:
            # As a provider's edge does (a load balancer's affinity, a bot check's cookie).
            if message["type"] == "http.response.start":
                cookie = (b"set-cookie", b"edge=user-a; Path=/; HttpOnly")
                message = {**message, "headers": [*message.get("headers", []), cookie]}
            await send(message)

        await inner(scope, receive, send_with_cookie)

    with serve_asgi(app, ready_path="/_fake/stats") as base:
        yield base


def upstream(base: str, **overrides: Any) -> Upstream:
    options: dict[str, Any] = {
        "base_url": f"{base}/v1",
        "api_key": "sk-test",
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
        "retries": 0,
        "max_seconds": 30.0,
        **overrides,
    }
    return Upstream(**options)


def complete(client: Upstream, **headers: str) -> tuple[list[Delta], Finished]:
    async def run() -> tuple[list[Delta], Finished]:
        try:
            return await client.complete(
                model="demo-model", messages=MESSAGES, max_tokens=50, request_id="req_t",
                headers=headers,
            )  # fmt: skip
        finally:
            await client.aclose()

    return asyncio.run(run())


def failure(client: Upstream, **headers: str) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        complete(client, **headers)
    return caught.value


def test_a_whole_reply_comes_with_its_usage(fake: str) -> None:
    deltas, finished = complete(upstream(fake))
    assert deltas[0].text and finished.usage is not None
    assert finished.usage.output_tokens == 12 and finished.finish_reason == "stop"


def test_a_streamed_reply_reuses_its_connection_for_the_next(fake: str) -> None:
    client = upstream(fake)

    async def stream() -> list[Delta | Finished]:
        return [
            event
            async for event in client.stream(
                model="demo-model", messages=MESSAGES, max_tokens=50, request_id="req_s"
            )
        ]

    async def run() -> list[list[Delta | Finished]]:
        try:
            return [await stream() for _ in range(3)]
        finally:
            await client.aclose()

    PORTS.clear()
    replies = asyncio.run(run())
    for events in replies:
        assert isinstance(events[-1], Finished) and events[-1].usage is not None
        assert "".join(e.text for e in events if isinstance(e, Delta))
    assert len(PORTS) == 3 and len(set(PORTS)) == 1, PORTS


def test_a_cookie_the_provider_sets_is_not_sent_with_later_calls(fake: str) -> None:
    """Every user's calls go through one client: what the provider set on one reply must
    not reach it again with another user's call. (By name, as a provider is reached: a
    client keeps no cookie of a bare IP address anyway.)"""
    client = upstream(fake.replace("127.0.0.1", "localhost"))

    async def run() -> None:
        try:
            for n in range(3):
                await client.complete(
                    model="demo-model", messages=MESSAGES, max_tokens=50, request_id=f"req_c{n}"
                )
        finally:
            await client.aclose()

    COOKIES.clear()
    asyncio.run(run())
    assert COOKIES == [b"", b"", b""]


def test_a_provider_that_does_not_answer_in_time_is_a_timeout(fake: str) -> None:
    error = failure(upstream(fake, read_timeout=0.3), **{"x-fake-fault": "timeout"})
    assert error.kind == "timeout"
    assert str(error) == "the model provider timed out"


def test_a_provider_that_cannot_be_reached_is_a_connection_failure() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = failure(upstream(f"http://127.0.0.1:{port}"))
    assert error.kind == "connection"
    assert str(error) == "the model provider could not be reached"


def test_an_error_status_is_reported_with_its_status(fake: str) -> None:
    error = failure(upstream(fake), **{"x-fake-fault": "500"})
    assert (error.kind, error.status) == ("status", 500)
    assert str(error) == "the model provider answered 500"


_REPLY = (
    b'{"id": "chatcmpl-k", "object": "chat.completion", "model": "demo-model", "choices": '
    b'[{"index": 0, "message": {"role": "assistant", "content": "Hello."}, '
    b'"finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2, '
    b'"total_tokens": 5}}'
)
_EVENTS = (
    b'data: {"id": "chatcmpl-k", "object": "chat.completion.chunk", "model": "demo-model", '
    b'"choices": [{"index": 0, "delta": {"content": "Hello."}, "finish_reason": "stop"}]}\n\n'
    b'data: {"id": "chatcmpl-k", "object": "chat.completion.chunk", "model": "demo-model", '
    b'"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, '
    b'"total_tokens": 5}}\n\ndata: [DONE]\n\n'
)


@pytest.fixture
def closes_idle() -> Iterator[tuple[str, list[int]]]:
    """A provider that closes a kept-alive connection as the next request arrives on it,
    without an answer: the race with its idle timeout, made certain. A new connection's
    first request is answered. Yields its base URL and the requests each connection got."""
    counts: list[int] = []
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts.append(0)
        index = len(counts) - 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                counts[index] += 1
                if counts[index] > 1:
                    break  # the idle timeout fired: no answer, the connection closes
                streamed = b'"stream": true' in body or b'"stream":true' in body
                payload = _EVENTS if streamed else _REPLY
                kind = b"text/event-stream" if streamed else b"application/json"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\nContent-Length: "
                    + str(len(payload)).encode() + b"\r\n\r\n" + payload
                )  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def serve() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop
        server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
        state["port"] = server.sockets[0].getsockname()[1]
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        yield f"http://127.0.0.1:{state['port']}", counts
    finally:
        state["loop"].call_soon_threadsafe(state["loop"].stop)
        thread.join(5)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_a_connection_the_provider_closed_while_idle_is_retried_on_a_fresh_one(
    closes_idle: tuple[str, list[int]], streamed: bool
) -> None:
    """A provider (or the proxy before it) closes a connection it has kept alive for long
    enough; a request sent on it at that moment gets a reset or no answer at all. Nothing
    reached the caller, so the request goes again, at once, on a new connection. Before,
    such a call failed with "could not be reached" (a 502, and in the chat an error)."""
    base, counts = closes_idle
    client = upstream(base, retries=1)

    async def call(n: int) -> str:
        if not streamed:
            deltas, _ = await client.complete(
                model="demo-model", messages=MESSAGES, max_tokens=50, request_id=f"req_k{n}"
            )
            return deltas[0].text
        text = ""
        async for event in client.stream(
            model="demo-model", messages=MESSAGES, max_tokens=50, request_id=f"req_k{n}"
        ):
            if isinstance(event, Delta):
                text += event.text
        return text

    async def run() -> list[str]:
        try:
            return [await call(n) for n in range(3)]
        finally:
            await client.aclose()

    assert asyncio.run(run()) == ["Hello."] * 3
    # Each connection answered one request and dropped the next: three calls, three
    # connections, two dropped requests sent again.
    assert counts == [2, 2, 1]


def test_a_connection_lost_again_and_again_fails_after_the_retries(
    closes_idle: tuple[str, list[int]],
) -> None:
    base, counts = closes_idle
    client = upstream(base, retries=0)

    async def run() -> UpstreamError:
        try:
            await client.complete(
                model="demo-model", messages=MESSAGES, max_tokens=50, request_id="req_k0"
            )
            with pytest.raises(UpstreamError) as caught:
                await client.complete(
                    model="demo-model", messages=MESSAGES, max_tokens=50, request_id="req_k1"
                )
            return caught.value
        finally:
            await client.aclose()

    error = asyncio.run(run())
    assert (error.kind, str(error)) == ("connection", "the model provider could not be reached")
    assert counts == [2]
