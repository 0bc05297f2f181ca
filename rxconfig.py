"""Reflex configuration. Everything the app itself reads lives in aicredits.settings."""

import reflex as rx

from aicredits.settings import get_settings

config = rx.Config(
    app_name="aicredits",
    # The websocket refuses pages from other sites (also checked by our own middleware).
    cors_allowed_origins=get_settings().allowed_origins,
    telemetry_enabled=False,
    plugins=[rx.plugins.RadixThemesPlugin()],
    disable_plugins=[rx.plugins.SitemapPlugin],
)
