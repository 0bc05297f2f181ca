"""The landing page: what this is, how it meters and bills (the flow diagram), how to sign
in, and what the models cost."""

from __future__ import annotations

from typing import Any

import reflex as rx

from aicredits.components.layout import page, scroll_region, sign_in_button
from aicredits.state.home import HomeState

# The steps of the diagram (assets/flow.svg, also in the README), in words.
STEPS = (
    ("Sign-in", "with Google, GitHub or any OpenID Connect provider; programs use a key."),
    ("The metered gateway", "checks each message or API call against its rate limits."),
    (
        "The credit ledger",
        "reserves the most the call can cost, calls the model, then charges what it used and "
        "releases the rest: you never pay for a failed call.",
    ),
    (
        "Quota and thresholds",
        "warn you at 50% and 80% of your credits, and pause the chat at 100%.",
    ),
    ("Stripe billing", "sells credit packs; each payment is credited exactly once."),
)


def _model_row(model: Any) -> rx.Component:  # an ObjectVar at compile time
    return rx.table.row(
        rx.table.cell(model["label"]),
        rx.table.cell(model["input"]),
        rx.table.cell(model["output"]),
        key=model["id"],
    )


def _flow() -> rx.Component:
    return rx.flex(
        rx.image(
            src="/flow.svg",
            alt="How a chat is metered and paid for: sign-in, the metered gateway, the credit "
            "ledger (reserve, then settle), quota and threshold checks, and Stripe billing, "
            "which credits the ledger.",
            width="100%",
            max_width="24em",
            height="auto",
            id="flow-diagram",
        ),
        rx.el.ol(
            *(
                rx.el.li(rx.text.strong(name), " ", text, margin_bottom="0.5em")
                for name, text in STEPS
            ),
            padding_left="1.25em",
            margin="0",
            id="flow-steps",
        ),
        direction=rx.breakpoints(initial="column", md="row"),
        gap="1.5em",
        align="start",
        width="100%",
    )


def home() -> rx.Component:
    return page(
        rx.heading("A paid AI chat that sustains itself", size="7", as_="h1"),
        rx.text(
            "Sign in, chat with an AI model, and pay only for what you use with prepaid "
            "credits. New accounts start with free trial credits. Every reply shows what it "
            "cost, and you are warned before you run out."
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
        rx.heading("How it works", size="5", as_="h2"),
        _flow(),
        rx.heading("Models and prices", size="5", as_="h2"),
        rx.text("Credits per 1K tokens.", size="2", color_scheme="gray"),
        scroll_region(
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
            label="Models and prices",
        ),
        rx.text("Database: ", HomeState.database, size="2", color_scheme="gray"),
    )
