"""Request context for the logs, HTTP metrics, and the guarded `/metrics` route.

`RequestContextMiddleware` wraps everything the backend serves. For each HTTP request it
takes the client's `X-Request-ID` when it is sane (else makes one), names the route by its
template (`/v1/chat/completions`, never a raw path that a client could vary), binds both
and the client's address (the real one behind a trusted proxy: see api/proxies.py) for the
log lines written while the request runs, echoes the id in the response, and
counts the request and its duration.

`GET /metrics` is the Prometheus scrape. It answers a Bearer token equal to
`METRICS_TOKEN` (compared in constant time) or a client address inside
`METRICS_ALLOW_NETWORKS`; anyone else gets 403, and a wrong token 401. A request that came
through a proxy (it carries X-Forwarded-For, Forwarded or X-Real-IP) while `TRUSTED_PROXIES`
is unset is never let in by its address: that address is the proxy's, and a proxy on this
machine would otherwise open the scrape to everyone. It needs the token.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Sequence
from functools import cached_property

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aicredits.adapters import logs, metrics
from aicredits.settings import Settings

logger = logging.getLogger(__name__)

# Reflex's own endpoints, by prefix; everything else it serves (pages, assets) is "other".
REFLEX_PREFIXES = ("/_event", "/_upload", "/_health", "/ping")
OTHER = "other"


def _path_of(scope: Scope) -> str:
    return str(scope.get("path", ""))


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        # Only plain routes: Reflex mounts itself into our Starlette app as a catch-all.
        self.routes = [r for r in routes if isinstance(r, Route)]

    def route_of(self, scope: Scope) -> str:
        """The route template a request is for, or a fixed label: a bounded set of values."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:  # PARTIAL: the path matched, the method did not
                return route.path
        path = _path_of(scope)
        for prefix in REFLEX_PREFIXES:
            if path == prefix or path.startswith(prefix + "/"):
                return prefix
        return OTHER

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                given = logs.sane_request_id(value.decode("latin-1"))
                break
        request_id = given or logs.new_request_id()
        route = self.route_of(scope)
        method = str(scope.get("method", "GET"))
        status = 500  # until the app says otherwise (an exception before any response)
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                # A route that set its own id (the /v1 API's, which keys the credit hold)
                # keeps it; everyone else gets this request's.
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        client = scope.get("client")
        with logs.request_scope(
            request_id=request_id,
            route=route,
            generated=given is None,
            client_ip=str(client[0]) if client else None,
        ):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                metrics.observe_http(route=route, method=method, status=status, seconds=elapsed)
                if route != OTHER and not route.startswith(REFLEX_PREFIXES):
                    detail = logs.current_detail()
                    logger.info(
                        "%s %s %d %.1f ms%s", method, _path_of(scope), status, elapsed * 1000,
                        f" {detail}" if detail else "",
                    )  # fmt: skip


# Headers a proxy adds to say whom it forwards for.
FORWARDING_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


class MetricsRoute:
    """`GET /metrics`, guarded by a token and/or the client's network."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.settings.metrics_allow_networks]

    def _through_unknown_proxy(self, request: Request) -> bool:
        """The request says it was forwarded, and no proxy is trusted to say whose it is."""
        if self.settings.trusted_proxies:
            return False  # its client is the one the trusted proxy named (api/proxies.py)
        return any(name in request.headers for name in FORWARDING_HEADERS)

    def _from_allowed_network(self, request: Request) -> bool:
        host = request.client.host if request.client else None
        if not host:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def _token_verdict(self, request: Request) -> bool | None:
        """True for the right token, False for a wrong one, None when none was sent."""
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, given = header.partition(" ")
        expected = self.settings.metrics_token.get_secret_value()
        if scheme.lower() != "bearer" or not expected:
            return False
        return hmac.compare_digest(given.strip().encode(), expected.encode())

    async def metrics(self, request: Request) -> Response:
        verdict = self._token_verdict(request)
        if verdict is False:
            return PlainTextResponse(
                "Unauthorized: wrong metrics token.",
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
        if not verdict and self._through_unknown_proxy(request):
            return PlainTextResponse(
                "Forbidden: this request came through a proxy and TRUSTED_PROXIES is not set,"
                " so its address is the proxy's; send the metrics token.",
                status_code=403,
            )
        if not verdict and not self._from_allowed_network(request):
            return PlainTextResponse(
                "Forbidden: send the metrics token, or scrape from an allowed network.",
                status_code=403,
            )
        body, content_type = metrics.render()
        return Response(body, media_type=content_type, headers={"cache-control": "no-store"})

    def routes(self) -> list[Route]:
        return [Route("/metrics", self.metrics, methods=["GET"])]
