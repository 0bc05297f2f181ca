"""Reflex configuration. Everything the app itself reads lives in aicredits.settings."""

import reflex as rx

config = rx.Config(
    app_name="aicredits",
    telemetry_enabled=False,
    plugins=[rx.plugins.RadixThemesPlugin()],
    disable_plugins=[rx.plugins.SitemapPlugin],
)
