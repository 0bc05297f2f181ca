"""`GET /credits/export.csv`: a user's own ledger and usage, for their records."""

from __future__ import annotations

from collections.abc import Iterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from aicredits.api.session import signed_in_user
from aicredits.api.small_pages import to_sign_in
from aicredits.services import dashboard
from aicredits.services.runtime import get_database
from aicredits.settings import get_settings


async def export_csv(request: Request) -> Response:
    settings = get_settings()
    user = await signed_in_user(request, settings)
    if user is None:
        return to_sign_in(settings)
    rows: Iterator[str] = dashboard.export_csv(get_database(), user_id=user.id)
    return StreamingResponse(
        rows,  # a sync iterator: Starlette runs it in a thread, off the event loop
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": 'attachment; filename="aicredits-history.csv"',
            "Cache-Control": "no-store",
        },
    )


routes = [Route("/credits/export.csv", export_csv, methods=["GET"])]
