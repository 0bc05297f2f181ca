"""HTTP routes beside the Reflex app, mounted with `rx.App(api_transformer=...)`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import psycopg
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from aicredits.api import auth_routes, export_routes, plan_routes, stripe_routes
from aicredits.api.front_door import FrontDoor
from aicredits.api.health_routes import readyz_route
from aicredits.api.observability import MetricsRoute, RequestContextMiddleware
from aicredits.api.openai_routes import API_PATHS, OpenAIRoutes
from aicredits.api.proxies import behind_proxies
from aicredits.api.security import SecurityMiddleware
from aicredits.settings import Settings

# Routes authenticated by the session cookie: their POSTs must come from our own pages.
COOKIE_ROUTES = ("/auth/", "/checkout/")

logger = logging.getLogger(__name__)

# The database cannot be reached (down, restarting, or a pooled connection it dropped). The
# failed statement's transaction rolled back, so nothing was applied: a retry is safe.
DATABASE_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.TimeoutError, psycopg.OperationalError)


async def healthz(_request: Request) -> JSONResponse:
    """Liveness: the process answers. Readiness (database, Redis) is /readyz."""
    return JSONResponse({"status": "ok"})


async def database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After instead of a bare 500, in the OpenAI error shape our API uses."""
    logger.error("the database is unavailable: %s", exc)
    body = {
        "error": {
            "message": "The service is temporarily unavailable; try again shortly.",
            "type": "service_unavailable",
            "code": "database_unavailable",
        }
    }
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


def build_api(settings: Settings) -> Starlette:
    openai_api = OpenAIRoutes(settings)
    return Starlette(
        routes=[
            # First: every metered call is one of these, and routes are tried in order.
            *openai_api.routes(),
            Route("/healthz", healthz, methods=["GET"]),
            readyz_route(settings),
            *auth_routes.routes,
            *stripe_routes.routes,
            *plan_routes.routes,
            *export_routes.routes,
            *MetricsRoute(settings).routes(),
        ],
        exception_handlers=dict.fromkeys(DATABASE_UNAVAILABLE, database_unavailable),
    )


class Secured:
    """The last transformer: our middleware around everything (below). Keeps what it built,
    the app the front door sends the API's routes to (api/front_door.py)."""

    def __init__(self, settings: Settings, routes: Sequence[BaseRoute]) -> None:
        self.settings = settings
        self.routes = routes
        self.app: ASGIApp | None = None

    def __call__(self, app: ASGIApp) -> ASGIApp:
        settings = self.settings
        checked = SecurityMiddleware(
            app,
            allowed_origins=settings.allowed_origins,
            cookie_route_prefixes=COOKIE_ROUTES,
            hsts=settings.https,
        )
        observed = RequestContextMiddleware(checked, routes=self.routes)
        self.app = behind_proxies(observed, settings.trusted_proxies)
        return self.app

    def front_door(self, reflex: ASGIApp) -> ASGIApp:
        """`reflex` (what Reflex built around everything), with the OpenAI-compatible API's
        routes sent straight to what this transformer built."""
        if self.app is None:
            raise RuntimeError("Reflex has not applied the api transformers yet")
        return FrontDoor(reflex, self.app, paths=API_PATHS)


def api_transformers(settings: Settings) -> tuple[Starlette, Secured]:
    """Our routes first (Reflex mounts itself inside them), then the security middleware
    around everything, the websocket included, then the request context (request id, route,
    user and client for the logs; HTTP metrics), so it sees the security refusals too, and
    outermost the real client's address behind a trusted proxy, so that everything inside
    (the per-address limits, the logs, Reflex's websocket) sees the client, not the proxy."""

    api = build_api(settings)
    routes = list(api.routes)  # ours, before Reflex mounts itself inside
    return api, Secured(settings, routes)
