"""HTTP routes beside the Reflex app, mounted with `rx.App(api_transformer=...)`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from aicredits.api import auth_routes, export_routes, stripe_routes
from aicredits.api.openai_routes import OpenAIRoutes
from aicredits.api.security import SecurityMiddleware
from aicredits.settings import Settings

# Routes authenticated by the session cookie: their POSTs must come from our own pages.
COOKIE_ROUTES = ("/auth/", "/checkout/")


async def healthz(_request: Request) -> JSONResponse:
    """Liveness: the process answers. Readiness (database, Redis) comes with production mode."""
    return JSONResponse({"status": "ok"})


def build_api(settings: Settings) -> Starlette:
    openai_api = OpenAIRoutes(settings)
    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            *auth_routes.routes,
            *openai_api.routes(),
            *stripe_routes.routes,
            *export_routes.routes,
        ]
    )


def api_transformers(settings: Settings) -> Sequence[Starlette | Callable[[ASGIApp], ASGIApp]]:
    """Our routes first (Reflex mounts itself inside them), then the security middleware
    around everything, the websocket included."""

    def secure(app: ASGIApp) -> ASGIApp:
        return SecurityMiddleware(
            app,
            allowed_origins=settings.allowed_origins,
            cookie_route_prefixes=COOKIE_ROUTES,
            hsts=settings.https,
        )

    return [build_api(settings), secure]
