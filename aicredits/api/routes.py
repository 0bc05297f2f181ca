"""HTTP routes beside the Reflex app, mounted with `rx.App(api_transformer=...)`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from aicredits.api import auth_routes
from aicredits.api.security import SecurityMiddleware
from aicredits.settings import Settings


async def healthz(_request: Request) -> JSONResponse:
    """Liveness: the process answers. Readiness (database, Redis) comes with production mode."""
    return JSONResponse({"status": "ok"})


def build_api() -> Starlette:
    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"]), *auth_routes.routes])


def api_transformers(settings: Settings) -> Sequence[Starlette | Callable[[ASGIApp], ASGIApp]]:
    """Our routes first (Reflex mounts itself inside them), then the security middleware
    around everything, the websocket included."""

    def secure(app: ASGIApp) -> ASGIApp:
        return SecurityMiddleware(
            app, allowed_origins=settings.allowed_origins, hsts=settings.https
        )

    return [build_api(), secure]
