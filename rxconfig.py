"""Reflex configuration. Everything the app itself reads lives in aicredits.settings."""

import reflex as rx

from aicredits.settings import get_settings

config = rx.Config(
    app_name="aicredits",
    # The websocket refuses pages from other sites (also checked by our own middleware).
    cors_allowed_origins=get_settings().allowed_origins,
    telemetry_enabled=False,
    # Indigo on slate: its solid buttons and soft badges pass WCAG AA contrast (the default
    # blue does not); "inherit" follows the visitor's light or dark setting (the header
    # toggles it).
    plugins=[
        rx.plugins.RadixThemesPlugin(
            theme=rx.theme(accent_color="indigo", gray_color="slate", appearance="inherit")
        )
    ],
    disable_plugins=[rx.plugins.SitemapPlugin],
)
