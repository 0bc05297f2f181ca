"""The landing page: what this is, how to sign in, and what it costs."""

from __future__ import annotations

from typing import Any

import reflex as rx

from aicredits.components.layout import page, sign_in_button
from aicredits.state.home import HomeState


def _model_row(model: Any) -> rx.Component:  # an ObjectVar at compile time
    return rx.table.row(
        rx.table.cell(model["label"]),
        rx.table.cell(model["input"]),
        rx.table.cell(model["output"]),
    )


def home() -> rx.Component:
    return page(
        rx.heading("A paid AI chat that sustains itself", size="7"),
        rx.text(
            "Sign in, chat with an AI model, and pay only for what you use with prepaid "
            "credits. New accounts start with free trial credits."
        ),
        rx.cond(
            HomeState.signed_in,
            rx.link(rx.button("Open the chat", size="3", id="open-chat"), href="/chat"),
            rx.vstack(
                rx.foreach(HomeState.providers, lambda p: sign_in_button(p, "/chat")),
                width="100%",
                max_width="22em",
                id="sign-in-buttons",
            ),
        ),
        rx.heading("Models and prices", size="5"),
        rx.text("Credits per 1K tokens.", size="2", color_scheme="gray"),
        rx.table.root(
            rx.table.header(
                rx.table.row(
                    rx.table.column_header_cell("Model"),
                    rx.table.column_header_cell("Input"),
                    rx.table.column_header_cell("Output"),
                )
            ),
            rx.table.body(rx.foreach(HomeState.models, _model_row)),
            id="price-table",
        ),
        rx.text("Database: ", HomeState.database, size="2", color_scheme="gray"),
    )
