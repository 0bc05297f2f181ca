"""The chat client to the model provider (adapters.upstream, on aiohttp) against the fake
upstream over real HTTP: each way a call can fail reaches the gateway as the right kind,
with the message the user is shown, and a reply read to its end reuses its connection."""

from __future__ import annotations

import asyncio
import socket
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
