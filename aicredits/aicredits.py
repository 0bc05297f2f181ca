"""The Reflex app: pages, their guards, and the HTTP routes mounted beside them."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import reflex as rx
from starlette.types import ASGIApp

from aicredits.adapters import stop_signals
from aicredits.adapters.db import get_database
from aicredits.adapters.logs import configure_logging
from aicredits.api.routes import api_transformers
from aicredits.pages import admin, auth, chat, credits, home, keys
from aicredits.services import gateway, jobs
from aicredits.services.production import refuse_unless_ready
from aicredits.settings import get_settings
from aicredits.state.admin import (
    AdminAuditLogState,
    AdminOverviewState,
    AdminPaymentsState,
    AdminPricesState,
    AdminUserAccountState,
    AdminUserSearchState,
)
from aicredits.state.auto_topup import AutoTopUpState
from aicredits.state.chat import ChatState
from aicredits.state.credits import CreditsState
from aicredits.state.home import HomeState
from aicredits.state.keys import KeysState
from aicredits.state.login import LoginState
from aicredits.state.plans import PlanState
from aicredits.state.session import SessionState

logger = logging.getLogger(__name__)

# First, so that every later line (a refused start included) is in the configured format.
configure_logging(get_settings())
# In production, a development default (Dev sign-in, simulated checkout...) stops the start.
refuse_unless_ready(get_settings())
_api, _secured = api_transformers(get_settings())


class _App(rx.App):
    """Reflex's app, served behind our front door (api/front_door.py): the /v1 API skips
    the layer Reflex wraps around everything it serves."""

    def __call__(self) -> ASGIApp:
        return _secured.front_door(super().__call__())


app = _App(api_transformer=[_api, _secured], stylesheets=["/app.css"])


async def _periodic_jobs() -> None:
    settings = get_settings()
    await jobs.run_forever(get_database(), settings, interval=settings.jobs_interval_seconds)


async def _recover_dead_workers_holds() -> None:
    settings = get_settings()
    await jobs.recover_forever(
        get_database(), settings, interval=settings.hold_sweep_interval_seconds
    )


async def _auto_topups() -> None:
    settings = get_settings()
    await jobs.top_up_forever(
        get_database(), settings, interval=settings.auto_topup_interval_seconds
    )


@contextlib.asynccontextmanager
async def _drain_on_shutdown() -> AsyncIterator[None]:
    """On SIGTERM or SIGINT (a deploy, a reload, Ctrl-C) replies in flight get the grace
    period, then are cut and settled for what they delivered (services.gateway). Started
    by the signal itself, since Granian runs the lifespan's shutdown only once every
    connection has closed; the lifespan's end drains too, for servers that get there, and
    then closes the gateways' connections."""
    loop = asyncio.get_running_loop()
    grace = get_settings().drain_grace
    draining: list[asyncio.Task[int]] = []
    if not stop_signals.call_before_stop(
        loop, lambda: draining.append(loop.create_task(gateway.drain_all(grace)))
    ):
        logger.warning(
            "this server gave no stop signal handler to chain to: replies in flight are drained"
            " only when the server ends the app's lifespan"
        )
    yield
    await asyncio.gather(gateway.drain_all(grace), *draining, return_exceptions=True)
    await gateway.close_all()


app.register_lifespan_task(_periodic_jobs)
app.register_lifespan_task(_recover_dead_workers_holds)
app.register_lifespan_task(_auto_topups)
app.register_lifespan_task(_drain_on_shutdown)
app.add_page(home.home, route="/", title="aicredits", on_load=HomeState.load)
app.add_page(auth.login, route="/login", title="Sign in · aicredits", on_load=LoginState.load)
app.add_page(
    auth.forbidden, route="/forbidden", title="aicredits", on_load=SessionState.load_visitor
)
# Signed-in pages: each on_load signs the visitor in once, sending a signed-out one to
# sign-in and back.
app.add_page(chat.chat, route="/chat", title="Chat · aicredits", on_load=ChatState.load)
app.add_page(
    credits.credits,
    route="/credits",
    title="Credits · aicredits",
    on_load=[CreditsState.load, PlanState.load, AutoTopUpState.load],
)
# Where Stripe's checkout returns; the success page signs a visitor in and back itself, so
# the session id in its query survives.
app.add_page(
    credits.success,
    route="/credits/success",
    title="Payment · aicredits",
    on_load=CreditsState.confirm,
)
app.add_page(
    credits.cancel,
    route="/credits/cancel",
    title="Checkout cancelled · aicredits",
    on_load=SessionState.require_login,
)
# The admin console. Each on_load and each handler checks the admin role on the server
# (state/guards.py); a page's on_load is its only check, so a load signs in once.
for _route, _component, _title, _load in (
    ("/admin", admin.overview, "Admin", AdminOverviewState.load),
    ("/admin/users", admin.users, "Users · Admin", AdminUserSearchState.load_users),
    ("/admin/user", admin.user_page, "User · Admin", AdminUserAccountState.load_user),
    ("/admin/audit", admin.audit, "Audit log · Admin", AdminAuditLogState.load_audit),
    ("/admin/prices", admin.prices, "Prices · Admin", AdminPricesState.load_prices),
    ("/admin/payments", admin.payments, "Payments · Admin", AdminPaymentsState.load_payments),
):
    app.add_page(
        _component,
        route=_route,
        title=f"{_title} · aicredits",
        on_load=_load,
    )
app.add_page(
    keys.keys_page,
    route="/keys",
    title="API keys · aicredits",
    on_load=KeysState.load,
)
