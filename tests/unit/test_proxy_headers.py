"""The client's real address behind a trusted proxy: TRUSTED_PROXIES, and the middleware
mounted outermost by `api_transformers`, for HTTP and for the websocket (Reflex's
`router.session.client_ip` is the scope's client)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any, cast

import pytest
from pydantic import ValidationError
from reflex.app import EventNamespace
from reflex_base.constants import RouteVar
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import ASGIApp
from starlette.websockets import WebSocket

from aicredits.adapters import logs
from aicredits.api.proxies import behind_proxies, with_ipv4_mapped
from aicredits.api.routes import api_transformers
from aicredits.settings import Settings

SITE = "https://credits.example.com"
PROXY = "10.0.0.1"
CLIENT = "203.0.113.7"
logger = logging.getLogger("aicredits.test.proxies")

# What the innermost app saw of the last websocket's scope.
seen: dict[str, Any] = {}


async def whoami(request: Request) -> Response:
    logger.info("inside the request")
    host = request.client.host if request.client else None
    return JSONResponse({"client": host, "scheme": request.url.scheme})


async def socket(websocket: WebSocket) -> None:
    seen["scope"] = dict(websocket.scope)
    await websocket.accept()
    client = websocket.scope["client"]
    await websocket.send_json({"client": client[0] if client else None})
    await websocket.close()


def settings(trusted: str = PROXY) -> Settings:
    return Settings(_env_file=None, public_url=SITE, trusted_proxies=trusted)


def stack(config: Settings) -> ASGIApp:
    """Our middleware exactly as the app mounts it, around a small inner app."""
    inner = Starlette(
        routes=[
            Route("/whoami", whoami, methods=["GET"]),
            Route("/auth/logout", whoami, methods=["POST"]),
            WebSocketRoute("/_event/", socket),
        ]
    )
    _api, secure = api_transformers(config)
    assert callable(secure) and not isinstance(secure, Starlette)
    return secure(inner)


def peer(address: str, config: Settings | None = None) -> TestClient:
    return TestClient(stack(config or settings()), client=(address, 41000))


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
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


def our_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [x for x in lines if x["logger"] == logger.name]


# --- the setting ---------------------------------------------------------------------------------


def test_trusted_proxies_are_read_comma_separated_and_written_canonically() -> None:
    config = settings(" 127.0.0.1, 10.0.0.7/8 ,2001:DB8::1, 2001:db8:0:0::/64")
    assert config.trusted_proxies == ["127.0.0.1", "10.0.0.0/8", "2001:db8::1", "2001:db8::/64"]


def test_no_proxy_is_trusted_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRUSTED_PROXIES", raising=False)
    assert Settings(_env_file=None).trusted_proxies == []


@pytest.mark.parametrize("bad", ["proxy.internal", "10.0.0.300", "*", "10.0.0.0/33", "10.0.0.1:80"])
def test_a_bad_trusted_proxy_is_a_settings_error_naming_it(
    bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRUSTED_PROXIES", f"127.0.0.1,{bad}")
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)
    assert "trusted_proxies" in str(caught.value)
    assert repr(bad) in str(caught.value)


def test_ipv4_proxies_are_also_trusted_as_ipv4_mapped_ipv6() -> None:
    assert with_ipv4_mapped(["10.0.0.1", "10.1.0.0/16", "2001:db8::1"]) == [
        "10.0.0.1",
        "10.1.0.0/16",
        "2001:db8::1",
        "::ffff:a00:1",
        "::ffff:a01:0/112",
    ]


def test_with_no_trusted_proxy_the_app_is_not_wrapped_at_all() -> None:
    inner = Starlette()
    assert behind_proxies(inner, []) is inner


# --- HTTP ----------------------------------------------------------------------------------------


def test_behind_a_trusted_proxy_the_client_is_the_forwarded_address(
    log_stream: io.StringIO,
) -> None:
    response = peer(PROXY).get(
        "/whoami", headers={"X-Forwarded-For": CLIENT, "X-Forwarded-Proto": "https"}
    )
    assert response.json() == {"client": CLIENT, "scheme": "https"}
    (line,) = our_lines(log_stream)
    assert line["client_ip"] == CLIENT  # the request context's logs name the client


def test_from_an_untrusted_peer_x_forwarded_for_changes_nothing(
    log_stream: io.StringIO,
) -> None:
    response = peer("198.51.100.9").get(
        "/whoami", headers={"X-Forwarded-For": CLIENT, "X-Forwarded-Proto": "https"}
    )
    assert response.json() == {"client": "198.51.100.9", "scheme": "http"}
    (line,) = our_lines(log_stream)
    assert line["client_ip"] == "198.51.100.9"


def test_with_the_setting_empty_even_the_proxy_is_not_believed() -> None:
    response = peer(PROXY, settings("")).get("/whoami", headers={"X-Forwarded-For": CLIENT})
    assert response.json()["client"] == PROXY


def test_an_address_the_client_put_in_the_header_is_not_believed() -> None:
    # The proxy appends what it saw; whatever the client sent stays on the left.
    response = peer(PROXY).get("/whoami", headers={"X-Forwarded-For": f"192.0.2.1, {CLIENT}"})
    assert response.json()["client"] == CLIENT


def test_a_chain_of_trusted_proxies_is_walked_back_to_the_client() -> None:
    config = settings("10.0.0.0/24")
    response = peer("10.0.0.1", config).get(
        "/whoami", headers={"X-Forwarded-For": f"192.0.2.1, {CLIENT}, 10.0.0.2"}
    )
    assert response.json()["client"] == CLIENT


def test_a_proxy_seen_as_ipv4_mapped_ipv6_is_trusted() -> None:
    response = peer(f"::ffff:{PROXY}").get("/whoami", headers={"X-Forwarded-For": CLIENT})
    assert response.json()["client"] == CLIENT


def test_the_origin_check_and_hsts_hold_behind_the_proxy() -> None:
    client = peer(PROXY)
    forwarded = {"X-Forwarded-For": CLIENT, "X-Forwarded-Proto": "https"}
    ours = client.post("/auth/logout", headers={**forwarded, "Origin": SITE})
    assert ours.status_code == 200
    assert ours.json() == {"client": CLIENT, "scheme": "https"}
    assert ours.headers["strict-transport-security"].startswith("max-age=")
    theirs = client.post("/auth/logout", headers={**forwarded, "Origin": "https://evil.example"})
    assert theirs.status_code == 403


# --- the websocket -------------------------------------------------------------------------------


def test_the_websocket_scope_gets_the_forwarded_client_which_reflex_reads() -> None:
    seen.clear()
    headers = {"Origin": SITE, "X-Forwarded-For": CLIENT, "X-Forwarded-Proto": "https"}
    with peer(PROXY).websocket_connect("/_event/", headers=headers) as ws:
        assert ws.receive_json() == {"client": CLIENT}
    scope = seen["scope"]
    assert scope["client"][0] == CLIENT
    assert scope["scheme"] == "wss"
    # What Reflex makes `router.session.client_ip` from (its own trusted_proxy_hops is 0).
    router_data = EventNamespace._build_static_router_data(
        cast(Any, None), "sid", {"asgi.scope": scope}
    )
    assert router_data[RouteVar.CLIENT_IP] == CLIENT


def test_the_websocket_from_an_untrusted_peer_keeps_its_own_address() -> None:
    seen.clear()
    headers = {"Origin": SITE, "X-Forwarded-For": CLIENT}
    with peer("198.51.100.9").websocket_connect("/_event/", headers=headers) as ws:
        assert ws.receive_json() == {"client": "198.51.100.9"}
    router_data = EventNamespace._build_static_router_data(
        cast(Any, None), "sid", {"asgi.scope": seen["scope"]}
    )
    assert router_data[RouteVar.CLIENT_IP] == "198.51.100.9"
