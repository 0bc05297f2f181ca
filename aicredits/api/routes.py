"""HTTP routes beside the Reflex app, mounted with `rx.App(api_transformer=...)`."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def healthz(_request: Request) -> JSONResponse:
    """Liveness: the process answers. Readiness (database, Redis) comes with production mode."""
    return JSONResponse({"status": "ok"})


def build_api() -> Starlette:
    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"])])
