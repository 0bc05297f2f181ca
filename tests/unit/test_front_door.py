"""The front door sends the OpenAI-compatible API's routes to our stack and everything else,
the websocket and lifespan included, to Reflex's."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from aicredits.api.front_door import FrontDoor
from aicredits.api.openai_routes import API_PATHS


class Recorder:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError("the middleware broke")


def call(door: FrontDoor, scope: dict[str, Any], sent: list[dict[str, Any]]) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    asyncio.run(door(scope, receive, send))


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ({"type": "http", "path": "/v1/chat/completions", "method": "POST"}, "ours"),
        ({"type": "http", "path": "/v1/embeddings", "method": "POST"}, "ours"),
        ({"type": "http", "path": "/v1/models", "method": "GET"}, "ours"),
        # Not one of the API's routes: Reflex's way, as before.
        ({"type": "http", "path": "/v1/nothing", "method": "GET"}, "reflex"),
        ({"type": "http", "path": "/v1/models/", "method": "GET"}, "reflex"),
        ({"type": "http", "path": "/healthz", "method": "GET"}, "reflex"),
        ({"type": "http", "path": "/chat", "method": "GET"}, "reflex"),
        ({"type": "websocket", "path": "/_event", "method": "GET"}, "reflex"),
        ({"type": "websocket", "path": "/v1/models"}, "reflex"),
        ({"type": "lifespan"}, "reflex"),
    ],
)
def test_each_request_goes_one_way(scope: dict[str, Any], expected: str) -> None:
    log: list[str] = []
    door = FrontDoor(Recorder("reflex", log), Recorder("ours", log), paths=API_PATHS)
    call(door, {"headers": [], **scope}, [])
    assert log == [expected]


def test_a_failure_in_our_stack_is_still_answered_with_a_500() -> None:
    log: list[str] = []
    sent: list[dict[str, Any]] = []
    door = FrontDoor(Recorder("reflex", log), Recorder("ours", log, fail=True), paths=API_PATHS)
    scope = {"type": "http", "path": "/v1/models", "method": "GET", "headers": []}
    with pytest.raises(RuntimeError, match="the middleware broke"):  # and the server logs it
        call(door, scope, sent)
    assert log == ["ours"]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500


def test_the_api_paths_are_the_routes_the_api_serves() -> None:
    from aicredits.api.openai_routes import OpenAIRoutes
    from aicredits.settings import Settings

    routes = OpenAIRoutes(Settings(_env_file=None)).routes()
    assert {r.path for r in routes} == API_PATHS
