"""The request-context middleware: request ids in and out, route templates, the user on
every log line written inside a request, and the HTTP metrics."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from aicredits.adapters import logs, metrics
from aicredits.api.observability import RequestContextMiddleware

logger = logging.getLogger("aicredits.test.middleware")


async def whoami(request: Request) -> Response:
    logs.set_user_id(int(request.path_params["user_id"]))
    logger.info("inside the request")
    return JSONResponse({"request_id": logs.current_request_id(), "route": logs.current_route()})


async def own_id(_request: Request) -> Response:
    return PlainTextResponse("mine", headers={"x-request-id": "req_own"})


async def boom(_request: Request) -> Response:
    raise RuntimeError("broken handler")


def build() -> TestClient:
    routes = [
        Route("/users/{user_id:int}/whoami", whoami, methods=["GET"]),
        Route("/own", own_id, methods=["GET"]),
        Route("/boom", boom, methods=["GET"]),
    ]
    inner = Starlette(routes=routes)
    return TestClient(RequestContextMiddleware(inner, routes=routes), raise_server_exceptions=False)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """What the app's loggers write while the test runs, as JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    watched = logging.getLogger("aicredits")
    old_level = watched.level
    watched.addHandler(handler)
    watched.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        watched.removeHandler(handler)
        watched.setLevel(old_level)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def http_count(route: str, status: str, method: str = "GET") -> float:
    metrics.flush()  # the counts tallied so far, in the registry
    value = REGISTRY.get_sample_value(
        "aicredits_http_requests_total", {"route": route, "method": method, "status": status}
    )
    return value or 0.0


def test_a_client_request_id_is_used_echoed_and_on_the_log_line(
    log_stream: io.StringIO,
) -> None:
    response = build().get("/users/7/whoami", headers={"X-Request-ID": "client-id-123"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "client-id-123"
    assert response.json() == {
        "request_id": "client-id-123",
        "route": "/users/{user_id:int}/whoami",
    }
    (line,) = [x for x in parsed(log_stream) if x["logger"] == logger.name]
    assert line["message"] == "inside the request"
    assert (line["request_id"], line["user_id"], line["route"]) == (
        "client-id-123",
        7,
        "/users/{user_id:int}/whoami",
    )


def test_without_a_sane_client_id_one_is_made_and_echoed() -> None:
    client = build()
    for sent in ({}, {"X-Request-ID": "bad id with spaces"}, {"X-Request-ID": "x" * 300}):
        response = client.get("/users/1/whoami", headers=sent)
        made = response.headers["x-request-id"]
        assert made.startswith("req_") and made == response.json()["request_id"]
        assert response.headers.get_list("x-request-id") == [made]
    first = client.get("/users/1/whoami").headers["x-request-id"]
    assert first != client.get("/users/1/whoami").headers["x-request-id"]


def test_a_route_that_sets_its_own_id_keeps_it_alone() -> None:
    response = build().get("/own", headers={"X-Request-ID": "client-id-123"})
    assert response.headers.get_list("x-request-id") == ["req_own"]


def test_the_access_line_carries_the_user_the_handler_found(log_stream: io.StringIO) -> None:
    build().get("/users/9/whoami", headers={"X-Request-ID": "trace-9"})
    access = [x for x in parsed(log_stream) if x["logger"] == "aicredits.api.observability"]
    assert len(access) == 1
    assert access[0]["message"].startswith("GET /users/9/whoami 200 ")
    assert (access[0]["request_id"], access[0]["user_id"]) == ("trace-9", 9)


def test_requests_are_counted_by_route_template_never_by_raw_path() -> None:
    client = build()
    template = "/users/{user_id:int}/whoami"
    before = http_count(template, "2xx")
    other_before = http_count("other", "4xx")
    event_before = http_count("/_event", "4xx")
    for user_id in (1, 2, 3):
        client.get(f"/users/{user_id}/whoami")
    client.get("/no/such/page")
    client.get("/_event/?EIO=4&transport=polling")
    assert http_count(template, "2xx") == before + 3
    assert http_count("other", "4xx") == other_before + 1
    assert http_count("/_event", "4xx") == event_before + 1
    assert (
        REGISTRY.get_sample_value(
            "aicredits_http_requests_total",
            {"route": "/users/1/whoami", "method": "GET", "status": "2xx"},
        )
        is None
    )
    assert (
        REGISTRY.get_sample_value(
            "aicredits_http_request_duration_seconds_count", {"route": template}
        )
        or 0
    ) >= 3


def test_a_crashing_handler_is_counted_as_a_5xx() -> None:
    before = http_count("/boom", "5xx")
    assert build().get("/boom").status_code == 500
    assert http_count("/boom", "5xx") == before + 1


def test_an_unknown_method_is_one_label_not_whatever_the_client_sent() -> None:
    client = build()
    before = http_count("/own", "4xx", method="other")
    assert client.request("BREW", "/own").status_code == 405
    assert http_count("/own", "4xx", method="other") == before + 1
