"""The Reflex app: pages, their guards, and the HTTP routes mounted beside them."""

import contextlib
import logging
from collections.abc import AsyncIterator

import reflex as rx

from aicredits.adapters.db import get_database
from aicredits.adapters.logs import configure_logging
from aicredits.api.routes import api_transformers
from aicredits.pages import admin, auth, chat, credits, home, keys
from aicredits.services import gateway, jobs
from aicredits.services.production import refuse_unless_ready
from aicredits.settings import get_settings
from aicredits.state.admin import AdminState
from aicredits.state.chat import ChatState
from aicredits.state.credits import CreditsState
from aicredits.state.home import HomeState
from aicredits.state.keys import KeysState
from aicredits.state.login import LoginState
from aicredits.state.session import SessionState

# First, so that every later line (a refused start included) is in the configured format.
configure_logging(get_settings())
# In production, a development default (Dev sign-in, simulated checkout...) stops the start.
refuse_unless_ready(get_settings())
app = rx.App(api_transformer=api_transformers(get_settings()))


async def _periodic_jobs() -> None:
    settings = get_settings()
    await jobs.run_forever(get_database(), settings, interval=settings.jobs_interval_seconds)


async def _recover_dead_workers_holds() -> None:
    settings = get_settings()
    await jobs.recover_forever(
        get_database(), settings, interval=settings.hold_sweep_interval_seconds
    )


@contextlib.asynccontextmanager
async def _drain_on_shutdown() -> AsyncIterator[None]:
    """On SIGTERM (a deploy, a reload, Ctrl-C) Granian stops taking connections and shuts
    the app's lifespan down: replies in flight get the grace period, then are cut and
    settled for what they delivered. Registered after Reflex's own event processor, so it
    exits first, while the websockets can still carry the cut replies' last words."""
    yield
    cut = await gateway.drain_all(get_settings().drain_grace)
    if cut:
        logging.getLogger(__name__).warning("drained: %d replies cut by the shutdown", cut)


app.register_lifespan_task(_periodic_jobs)
app.register_lifespan_task(_recover_dead_workers_holds)
app.register_lifespan_task(_drain_on_shutdown)
app.add_page(home.home, route="/", title="aicredits", on_load=HomeState.load)
app.add_page(auth.login, route="/login", title="Sign in · aicredits", on_load=LoginState.load)
app.add_page(
    auth.forbidden, route="/forbidden", title="aicredits", on_load=SessionState.load_visitor
)
# Signed-in pages: the on_load guard sends a signed-out visitor to sign-in and back.
app.add_page(chat.chat, route="/chat", title="Chat · aicredits", on_load=ChatState.load)
app.add_page(
    credits.credits,
    route="/credits",
    title="Credits · aicredits",
    on_load=[SessionState.require_login, CreditsState.load],
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
# The admin console. Each on_load and each handler checks the admin role on the server.
for _route, _component, _title, _load in (
    ("/admin", admin.overview, "Admin", AdminState.load),
    ("/admin/users", admin.users, "Users · Admin", AdminState.load_users),
    ("/admin/user", admin.user_page, "User · Admin", AdminState.load_user),
    ("/admin/audit", admin.audit, "Audit log · Admin", AdminState.load_audit),
    ("/admin/prices", admin.prices, "Prices · Admin", AdminState.load_prices),
):
    app.add_page(
        _component,
        route=_route,
        title=f"{_title} · aicredits",
        on_load=[SessionState.require_admin, _load],
    )
app.add_page(
    keys.keys_page,
    route="/keys",
    title="API keys · aicredits",
    on_load=[SessionState.require_login, KeysState.load],
)
