"""The plan section of the credits page: the plan this period (allowance used and left, the
reset date, a banner when a payment failed), "Manage billing", the plans for sale, and the
subscription invoices."""

from __future__ import annotations

from typing import Any

import reflex as rx

from aicredits.components.layout import PostForm, list_table
from aicredits.state.credits import CreditsState
from aicredits.state.plans import PlanState


def _past_due_banner() -> rx.Component:
    return rx.callout(
        rx.cond(
            PlanState.past_due_usable,
            "Your last payment failed. Stripe retries it over the next days and your plan "
            "keeps working meanwhile; update your card with “Manage billing” to keep it.",
            "Your last payment failed, so your plan's credits are paused. Update your card "
            "with “Manage billing”; the plan resumes as soon as the payment goes through.",
        ),
        icon="triangle_alert",
        color_scheme="red",
        id="plan-past-due",
    )


def _manage_billing(portal_action: str) -> rx.Component:
    return PostForm.create(
        rx.button("Manage billing", type="submit", variant="soft", id="manage-billing"),
        action=portal_action,
        method="post",
    )


def _current_plan(portal_action: str) -> rx.Component:
    return rx.vstack(
        rx.cond(PlanState.past_due, _past_due_banner()),
        rx.card(
            rx.vstack(
                rx.hstack(
                    rx.heading(PlanState.plan_name, " plan", size="4", id="plan-name"),
                    rx.badge(PlanState.plan_status, id="plan-status"),
                    align="center",
                ),
                rx.text("Period: ", PlanState.period_text, id="plan-period"),
                rx.text(
                    PlanState.used_text,
                    " of ",
                    PlanState.included_text,
                    " included credits used, ",
                    PlanState.remaining_text,
                    " left",
                    id="plan-usage",
                ),
                rx.progress(value=PlanState.used_percent, max=100, width="100%"),
                rx.cond(
                    PlanState.has_overage,
                    rx.text(PlanState.overage_text, size="2", id="plan-overage"),
                ),
                rx.text(
                    rx.cond(
                        PlanState.cancel_at_period_end,
                        "Cancelled: the plan ends on ",
                        "Resets on ",
                    ),
                    rx.el.strong(PlanState.reset_date, id="plan-reset-date"),
                    size="2",
                    color_scheme="gray",
                ),
                _manage_billing(portal_action),
                spacing="2",
                width="100%",
            ),
            width="100%",
            id="plan-card",
        ),
        width="100%",
    )


def _offer_card(offer: Any, action: str) -> rx.Component:  # an ObjectVar at compile time
    return rx.card(
        rx.vstack(
            rx.heading(offer["label"], size="4"),
            rx.text(offer["offer"], id=rx.Var.create("plan-offer-") + offer["id"]),
            PostForm.create(
                rx.el.input(type="hidden", name="plan", value=offer["id"]),
                rx.button(
                    "Subscribe",
                    type="submit",
                    size="3",
                    id=rx.Var.create("subscribe-") + offer["id"],
                ),
                action=action,
                method="post",
            ),
            spacing="3",
        ),
        min_width="14em",
    )


def _offers(subscribe_action: str) -> rx.Component:
    return rx.vstack(
        rx.text(
            "A plan gives a set number of credits each month, spent before any packs; what "
            "is left expires when the month resets.",
            color_scheme="gray",
        ),
        rx.cond(
            CreditsState.simulated,
            rx.callout(
                "Simulated billing: no Stripe key is configured, so “Subscribe” and “Manage "
                "billing” open local stand-ins for Stripe's pages. They send correctly signed "
                "events to this site's webhook; no real payment is taken.",
                icon="flask_conical",
                color_scheme="amber",
                id="simulated-billing-notice",
            ),
        ),
        rx.flex(
            rx.foreach(PlanState.plan_offers, lambda o: _offer_card(o, subscribe_action)),
            spacing="4",
            wrap="wrap",
        ),
        width="100%",
    )


def plan_section(subscribe_action: str, portal_action: str) -> rx.Component:
    return rx.vstack(
        rx.heading("Plan", size="4"),
        rx.cond(PlanState.has_plan, _current_plan(portal_action), _offers(subscribe_action)),
        width="100%",
        id="plan-section",
    )


def _invoice_row(row: Any) -> rx.Component:
    return rx.table.row(
        rx.table.cell(row["date"], white_space="nowrap"),
        rx.table.cell(row["plan"]),
        rx.table.cell(row["amount"], white_space="nowrap"),
        rx.table.cell(row["credits"]),
        rx.table.cell(rx.badge(row["status"])),
        rx.table.cell(
            rx.hstack(
                rx.cond(
                    row["hosted_url"] != "",
                    rx.link("Invoice", href=row["hosted_url"], is_external=True),
                    rx.text("—", color_scheme="gray"),
                ),
                rx.cond(
                    row["pdf_url"] != "",
                    rx.link("PDF", href=row["pdf_url"], is_external=True),
                ),
            )
        ),
        id=rx.Var.create("invoice-") + row["id"],
    )


def invoice_list() -> rx.Component:
    return list_table(
        PlanState.invoices,
        ["Date", "Plan", "Paid", "Credits", "Status", "Invoice"],
        _invoice_row,
        table_id="invoice-list",
        label="Invoices",
        empty=rx.text("No invoices yet.", id="invoice-list-empty", color_scheme="gray"),
    )
