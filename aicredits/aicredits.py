"""The Reflex app: pages plus the HTTP routes mounted beside them."""

import reflex as rx

from aicredits.api.routes import build_api
from aicredits.pages.home import home
from aicredits.state.home import HomeState

app = rx.App(api_transformer=build_api())
app.add_page(home, route="/", title="aicredits", on_load=HomeState.load)
