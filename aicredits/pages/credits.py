"""Buying credits: the packs, the balance, the purchase history, and the pages Stripe's
checkout returns to."""

from __future__ import annotations

from typing import Any

import reflex as rx

from aicredits.components.layout import PostForm, page
from aicredits.settings import get_settings
from aicredits.state.credits import CreditsState
from aicredits.state.session import SessionState


def _simulated_notice() -> rx.Component:
    return rx.callout(
        'Simulated checkout: no Stripe key is configured, so "Buy" opens a local stand-in '
        "for Stripe's page. Paying there sends a correctly signed event to this site's "
        "webhook; no real payment is taken.",
        icon="flask_conical",
        color_scheme="amber",
        id="simulated-checkout-notice",
    )


def _pack_card(pack: Any, action: str) -> rx.Component:  # an ObjectVar at compile time
    return rx.card(
        rx.vstack(
            rx.heading(pack["label"], size="4"),
            rx.text(pack["offer"], id=rx.Var.create("pack-offer-") + pack["id"]),
            # A real form post: the backend creates the session and redirects to Stripe.
            PostForm.create(
                rx.el.input(type="hidden", name="pack", value=pack["id"]),
                rx.button("Buy", type="submit", size="3", id=rx.Var.create("buy-") + pack["id"]),
                action=action,
                method="post",
            ),
            spacing="3",
        ),
        min_width="14em",
    )


def _history_row(row: Any) -> rx.Component:
    return rx.table.row(
        rx.table.cell(row["date"], white_space="nowrap"),
        rx.table.cell(row["pack"]),
        rx.table.cell(row["amount"], white_space="nowrap"),
        rx.table.cell(row["credits"]),
        rx.table.cell(rx.badge(row["status"])),
        rx.table.cell(
            rx.cond(
                row["receipt_url"] != "",
                rx.link("Receipt", href=row["receipt_url"], is_external=True),
                rx.text("—", color_scheme="gray"),
            )
        ),
        id=rx.Var.create("purchase-") + row["id"],
    )


def _history() -> rx.Component:
    return rx.cond(
        CreditsState.purchases.length() > 0,  # type: ignore[attr-defined]
        rx.table.root(
            rx.table.header(
                rx.table.row(
                    rx.table.column_header_cell("Date"),
                    rx.table.column_header_cell("Pack"),
                    rx.table.column_header_cell("Paid"),
                    rx.table.column_header_cell("Credits"),
                    rx.table.column_header_cell("Status"),
                    rx.table.column_header_cell("Receipt"),
                )
            ),
            rx.table.body(rx.foreach(CreditsState.purchases, _history_row)),
            id="purchase-history",
            width="100%",
            max_width="100%",
            overflow_x="auto",
        ),
        rx.text("No purchases yet.", id="purchase-history-empty", color_scheme="gray"),
    )


def credits() -> rx.Component:
    action = f"{get_settings().api_url}/checkout/start"  # at render time: this deployment's
    return page(
        rx.heading("Credits", size="6"),
        rx.text(
            "Available: ",
            rx.text.strong(SessionState.available_credits, id="credits-available"),
            " credits",
        ),
        rx.cond(CreditsState.simulated, _simulated_notice()),
        rx.heading("Buy credits", size="4"),
        rx.flex(
            rx.foreach(CreditsState.packs, lambda p: _pack_card(p, action)),
            spacing="4",
            wrap="wrap",
        ),
        rx.heading("Purchase history", size="4"),
        _history(),
        signed_in_only=True,
    )


def _outcome(kind: str, color: str, icon: str) -> rx.Component:
    return rx.callout(
        CreditsState.outcome_message,
        icon=icon,
        color_scheme=color,
        id=f"checkout-{kind}",
    )


def success() -> rx.Component:
    return page(
        rx.heading("Thank you", size="6"),
        rx.match(
            CreditsState.outcome,
            ("credited", _outcome("credited", "green", "circle_check")),
            (
                "processing",
                rx.vstack(
                    _outcome("processing", "blue", "clock"),
                    rx.button(
                        "Check again",
                        on_click=CreditsState.confirm,
                        variant="soft",
                        id="check-again",
                    ),
                ),
            ),
            ("failed", _outcome("failed", "red", "circle_x")),
            ("cancelled", _outcome("cancelled", "gray", "circle_slash")),
            ("unknown", _outcome("unknown", "amber", "circle_help")),
            rx.hstack(rx.spinner(), rx.text("Confirming your payment…"), id="checkout-checking"),
        ),
        rx.link("Back to credits", href="/credits", id="back-to-credits"),
        signed_in_only=True,
    )


def cancel() -> rx.Component:
    return page(
        rx.heading("Checkout cancelled", size="6"),
        rx.callout(
            "Checkout cancelled, nothing was charged.",
            icon="circle_slash",
            color_scheme="gray",
            id="checkout-cancelled",
        ),
        rx.link("Back to credits", href="/credits", id="back-to-credits"),
        signed_in_only=True,
    )
