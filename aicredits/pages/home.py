"""The landing page. Sign-in, chat and credits pages arrive with their issues."""

from __future__ import annotations

from typing import Any

import reflex as rx

from aicredits.state.home import HomeState


def _model_row(model: Any) -> rx.Component:  # an ObjectVar at compile time
    return rx.table.row(
        rx.table.cell(model["label"]),
        rx.table.cell(model["input"]),
        rx.table.cell(model["output"]),
    )


def home() -> rx.Component:
    return rx.container(
        rx.vstack(
            rx.heading("aicredits", size="8"),
            rx.text(
                "A paid AI chat that sustains itself: sign in, buy prepaid credits, chat, "
                "and see every credit you spend."
            ),
            rx.callout(
                "This is the foundation release: the credit ledger and the price table are "
                "in place; sign-in, chat and checkout come next.",
                icon="info",
                id="foundation-notice",
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
            spacing="4",
            padding_y="2em",
        ),
        size="2",
    )
