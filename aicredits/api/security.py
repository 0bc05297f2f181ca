"""ASGI middleware in front of everything the backend serves, Reflex's websocket included.

* Origin: a browser page from another site must not open our websocket (cross-site
  websocket hijacking) or post to our cookie-authenticated routes (CSRF). The websocket and
  every state-changing request on those routes must carry an allowed Origin.
* HSTS on every response when the public URL is https.

Routes authenticated by something other than the cookie (API keys, Stripe signatures) are
not cookie-authenticated and are not checked here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HSTS = b"max-age=31536000; includeSubDomains"


class SecurityMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_origins: Iterable[str],
        websocket_prefix: str = "/_event",
        cookie_route_prefixes: Iterable[str] = ("/auth/",),
        hsts: bool = False,
    ) -> None:
        self.app = app
        self.allowed = frozenset(o.rstrip("/") for o in allowed_origins)
        self.websocket_prefix = websocket_prefix
        self.cookie_routes = tuple(cookie_route_prefixes)
        self.hsts = hsts

    def _origin(self, scope: Scope) -> str | None:
        """The request's one Origin. Several Origin headers (no browser sends that) count as
        none, so a second, allowed value cannot smuggle a foreign one through."""
        found = [v for k, v in scope.get("headers", []) if k == b"origin"]
        return found[0].decode("latin-1") if len(found) == 1 else None

    def _needs_origin(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        if path.startswith(self.websocket_prefix):
            return True  # the websocket, and engine.io's HTTP fallback, whatever the method
        return scope["type"] == "http" and (
            scope.get("method", "GET") not in SAFE_METHODS and path.startswith(self.cookie_routes)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self._needs_origin(scope):
            origin = self._origin(scope)
            if origin is None or origin.rstrip("/") not in self.allowed:
                logger.warning(
                    "refused %s %s from origin %r", scope["type"], scope.get("path"), origin
                )
                await self._refuse(scope, send)
                return
        if self.hsts and scope["type"] == "http":
            send = self._with_hsts(send)
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b"Forbidden: this request must come from the site's own pages (Origin check)."
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _with_hsts(self, send: Send) -> Send:
        async def send_with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"strict-transport-security", HSTS)],
                }
            await send(message)

        return send_with_hsts
