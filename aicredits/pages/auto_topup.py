"""The auto top-up section of /credits, and its banner when a top-up failed."""

from __future__ import annotations

from typing import Any

import reflex as rx

from aicredits.components.layout import list_table
from aicredits.state.auto_topup import AutoTopUpState
from aicredits.state.credits import CreditsState

SIMULATED_OUTCOMES = [
    ("succeed", "succeeds"),
    ("decline", "is declined"),
    ("expired_card", "finds the card expired"),
    ("authentication_required", "needs authentication"),
]


def _card() -> rx.Component:
    return rx.cond(
        AutoTopUpState.has_card,
        rx.hstack(
            rx.icon("credit_card"),
            rx.text(AutoTopUpState.card_text, id="saved-card"),
            rx.cond(AutoTopUpState.card_simulated, rx.badge("simulated", color_scheme="amber")),
            rx.button(
                "Remove card",
                variant="soft",
                color_scheme="red",
                on_click=AutoTopUpState.remove_card,
                id="remove-card",
            ),
            align="center",
            wrap="wrap",
        ),
        rx.hstack(
            rx.text("No card saved.", color_scheme="gray"),
            rx.button("Save a card", on_click=AutoTopUpState.add_card, id="add-card"),
            align="center",
        ),
    )


def _form() -> rx.Component:
    return rx.form(
        rx.vstack(
            rx.hstack(
                rx.switch(
                    checked=AutoTopUpState.topup_enabled,
                    on_change=AutoTopUpState.set_enabled,
                    id="topup-enabled",
                    # Submitted by name ("on" when on, nothing when off), as Reflex 0.11
                    # will only submit named controls.
                    name="enabled",
                ),
                rx.el.label("Auto top-up on", html_for="topup-enabled"),
                align="center",
            ),
            rx.hstack(
                rx.el.label("When my available credits fall below", html_for="topup-threshold"),
                rx.input(
                    name="threshold",
                    default_value=AutoTopUpState.topup_threshold,
                    key=AutoTopUpState.topup_threshold,
                    input_mode="numeric",
                    id="topup-threshold",
                    width="9em",
                ),
                rx.el.label("buy", html_for="topup-pack"),
                rx.select.root(
                    rx.select.trigger(id="topup-pack", aria_label="Pack to buy"),
                    rx.select.content(
                        rx.foreach(
                            CreditsState.packs,
                            lambda p: rx.select.item(p["offer"], value=p["id"]),
                        )
                    ),
                    name="pack",
                    value=AutoTopUpState.topup_pack,
                    on_change=AutoTopUpState.set_pack,
                ),
                align="center",
                wrap="wrap",
            ),
            rx.hstack(
                rx.el.label("At most", html_for="topup-cap"),
                rx.input(
                    name="monthly_cap",
                    default_value=AutoTopUpState.topup_cap,
                    key=AutoTopUpState.topup_cap,
                    input_mode="numeric",
                    id="topup-cap",
                    width="5em",
                ),
                rx.text(
                    "top-ups a month (", AutoTopUpState.topup_this_month, " so far this month)"
                ),
                align="center",
                wrap="wrap",
            ),
            rx.button("Save", type="submit", id="topup-save"),
            spacing="3",
        ),
        on_submit=AutoTopUpState.save,
        id="topup-form",
    )


def _history_row(row: Any) -> rx.Component:
    return rx.table.row(
        rx.table.cell(row["date"], white_space="nowrap"),
        rx.table.cell(row["pack"]),
        rx.table.cell(row["amount"], white_space="nowrap"),
        rx.table.cell(row["credits"]),
        rx.table.cell(rx.badge(row["status"])),
        rx.table.cell(row["failure"]),
        id=rx.Var.create("topup-") + row["id"],
    )


def _history() -> rx.Component:
    return list_table(
        AutoTopUpState.topup_history,
        ["Date", "Pack", "Amount", "Credits", "Status", "Why"],
        _history_row,
        table_id="topup-history",
        label="Auto top-ups",
    )


def _simulate_switch() -> rx.Component:
    return rx.cond(
        AutoTopUpState.simulate_available & AutoTopUpState.card_simulated,
        rx.hstack(
            rx.el.label("Development: the next simulated charge", html_for="simulate-next"),
            rx.select.root(
                rx.select.trigger(id="simulate-next", aria_label="Next simulated charge"),
                rx.select.content(
                    *[rx.select.item(text, value=value) for value, text in SIMULATED_OUTCOMES]
                ),
                value=AutoTopUpState.simulate_next,
                on_change=AutoTopUpState.simulate,
            ),
            align="center",
            wrap="wrap",
        ),
    )


def auto_topup_section() -> rx.Component:
    return rx.vstack(
        rx.heading("Auto top-up", size="4"),
        rx.text(
            "Never run out in the middle of your work: when your available credits fall "
            "below a threshold, your saved card buys a pack.",
            size="2",
            color_scheme="gray",
        ),
        rx.cond(
            AutoTopUpState.topup_error != "",
            rx.callout(AutoTopUpState.topup_error, color_scheme="red", id="topup-error"),
        ),
        rx.cond(
            AutoTopUpState.topup_saved != "",
            rx.callout(AutoTopUpState.topup_saved, color_scheme="green", id="topup-saved"),
        ),
        _card(),
        _form(),
        _simulate_switch(),
        _history(),
        spacing="3",
        width="100%",
        id="auto-topup",
    )
