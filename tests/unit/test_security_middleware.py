"""The Origin check in front of the websocket and the cookie-authenticated routes, and HSTS."""

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from aicredits.api.security import SecurityMiddleware

SITE = "https://app.example.com"


async def ok(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


def client(hsts: bool = False) -> TestClient:
    inner = Starlette(
        routes=[
            Route("/auth/logout", ok, methods=["POST"]),
            Route("/auth/callback/dev", ok, methods=["GET"]),
            Route("/v1/chat/completions", ok, methods=["POST"]),
            WebSocketRoute("/_event/", socket),
        ]
    )
    return TestClient(SecurityMiddleware(inner, allowed_origins=[SITE], hsts=hsts))


def test_a_post_from_the_site_itself_passes() -> None:
    assert client().post("/auth/logout", headers={"Origin": SITE}).status_code == 200


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://app.example.com"])
def test_a_post_from_another_origin_is_refused(origin: str) -> None:
    response = client().post("/auth/logout", headers={"Origin": origin})
    assert response.status_code == 403
    assert "Origin" in response.text


def test_a_post_without_origin_is_refused() -> None:
    assert client().post("/auth/logout").status_code == 403


def test_gets_and_non_cookie_routes_are_not_origin_checked() -> None:
    c = client()
    assert c.get("/auth/callback/dev").status_code == 200  # the provider's redirect
    assert c.post("/v1/chat/completions").status_code == 200  # API keys, not cookies


def test_the_websocket_opens_for_the_site() -> None:
    with client().websocket_connect("/_event/", headers={"Origin": SITE}) as ws:
        assert ws.receive_text() == "hello"


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"}, {}])
def test_the_websocket_is_refused_for_a_foreign_or_missing_origin(headers: dict[str, str]) -> None:
    with (
        pytest.raises(WebSocketDisconnect),
        client().websocket_connect("/_event/", headers=headers),
    ):
        pass


def test_hsts_is_sent_when_the_site_is_https() -> None:
    response = client(hsts=True).get("/auth/callback/dev")
    assert response.headers["strict-transport-security"].startswith("max-age=31536000")
    assert "strict-transport-security" not in client().get("/auth/callback/dev").headers


def test_two_origin_headers_count_as_none() -> None:
    response = client().post(
        "/auth/logout", headers=[("Origin", SITE), ("Origin", "https://evil.example")]
    )
    assert response.status_code == 403
