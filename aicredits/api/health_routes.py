"""`/readyz`: 200 when this worker can serve (database and Redis answer), else 503 naming
what is down. `/healthz` (in routes.py) is liveness only."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aicredits.services.readiness import check_readiness
from aicredits.settings import Settings


def readyz_route(settings: Settings) -> Route:
    async def readyz(_request: Request) -> JSONResponse:
        readiness = await check_readiness(
            database_url=settings.database_url, redis_url=settings.redis_url
        )
        if readiness.ready:
            return JSONResponse({"status": "ready", "checks": readiness.checks})
        return JSONResponse(
            {"status": "unavailable", "down": readiness.down, "checks": readiness.checks},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    return Route("/readyz", readyz, methods=["GET"])
