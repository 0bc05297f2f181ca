"""What the server calls for every request: the OpenAI-compatible API's routes go straight to
our own stack, everything else through Reflex's.

Reflex wraps all it serves in a Starlette app of its own: an error page, CORS, a middleware
that sets Reflex's context variables, and a router whose one mount is the app our
transformers built (api/routes.py: our middleware around our Starlette app, inside which
Reflex's own app is mounted). The /v1 routes use nothing of Reflex's, and every metered call
is one of them, so here they skip that outer layer and enter the transformed app directly.
They still get everything they had: the trusted-proxy client, the request context, the
security middleware, and our Starlette app's own error page, CORS (Reflex adds the same
CORSMiddleware to it) and exception handlers. A Starlette error page also wraps them here, as
Reflex's did, for a failure in the middleware itself.

Every response of such a request passes through half as many send wrappers: a streamed
reply's first token, and each of its events, get out sooner.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send


class FrontDoor:
    def __init__(self, reflex: ASGIApp, ours: ASGIApp, *, paths: Collection[str]) -> None:
        self.reflex = reflex
        self.ours = ServerErrorMiddleware(ours)
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            await self.ours(scope, receive, send)
        else:
            await self.reflex(scope, receive, send)
