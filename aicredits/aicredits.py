"""The Reflex app: pages, their guards, and the HTTP routes mounted beside them."""

import reflex as rx

from aicredits.api.routes import api_transformers
from aicredits.pages import auth, home, placeholders
from aicredits.settings import get_settings
from aicredits.state.admin import AdminState
from aicredits.state.home import HomeState
from aicredits.state.login import LoginState
from aicredits.state.session import SessionState

app = rx.App(api_transformer=api_transformers(get_settings()))
app.add_page(home.home, route="/", title="aicredits", on_load=HomeState.load)
app.add_page(auth.login, route="/login", title="Sign in · aicredits", on_load=LoginState.load)
app.add_page(
    auth.forbidden, route="/forbidden", title="aicredits", on_load=SessionState.load_visitor
)
# Signed-in pages: the on_load guard sends a signed-out visitor to sign-in and back.
app.add_page(
    placeholders.chat, route="/chat", title="Chat · aicredits", on_load=SessionState.require_login
)
app.add_page(
    placeholders.credits,
    route="/credits",
    title="Credits · aicredits",
    on_load=SessionState.require_login,
)
app.add_page(
    placeholders.admin,
    route="/admin",
    title="Admin · aicredits",
    on_load=[SessionState.require_admin, AdminState.load],
)
