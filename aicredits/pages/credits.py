"""Buying credits: the packs, the balance, the purchase history, and the pages Stripe's
checkout returns to."""

from __future__ import annotations

from typing import Any

import reflex as rx

from aicredits.components.layout import PostForm, list_table, page, scroll_region, trial_notice
from aicredits.pages.auto_topup import auto_topup_section
from aicredits.pages.plans import invoice_list, plan_section
from aicredits.settings import get_settings
from aicredits.state.credits import CreditsState


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
    return list_table(
        CreditsState.purchases,
        ["Date", "Pack", "Paid", "Credits", "Status", "Receipt"],
        _history_row,
        table_id="purchase-history",
        label="Purchases",
        empty=rx.text("No purchases yet.", id="purchase-history-empty", color_scheme="gray"),
    )


CHART_COLORS = ["#3e63dd", "#e5484d", "#30a46c", "#f76b15", "#8e4ec6", "#0090ff"]
HISTORY_KINDS = ["all", "grant", "purchase", "spend", "refund", "adjustment", "clawback", "expiry"]


def _stat(label: str, value: Any, element_id: str, note: Any = None) -> rx.Component:
    """A figure on a card; `note` (a Var, e.g. the money equivalent) shows when not empty."""
    lines = [
        rx.text(label, size="2", color_scheme="gray"),
        rx.heading(value, size="6", id=element_id),
    ]
    if note is not None:
        lines.append(rx.cond(note != "", rx.text("≈ ", note, size="1", color_scheme="gray")))
    return rx.card(rx.vstack(*lines, spacing="1"), min_width="10em")


def _balance() -> rx.Component:
    return rx.vstack(
        rx.flex(
            _stat(
                "Available",
                CreditsState.available_credits_text,
                "credits-available",
                CreditsState.available_money,
            ),
            _stat("Held (in flight)", CreditsState.held_credits, "credits-held"),
            _stat("Total", CreditsState.total_credits, "credits-total", CreditsState.total_money),
            spacing="3",
            wrap="wrap",
        ),
        rx.cond(
            CreditsState.expiring.length() > 0,  # type: ignore[attr-defined]
            rx.vstack(
                rx.text("Expiring credits", size="2", weight="medium"),
                rx.foreach(
                    CreditsState.expiring,
                    lambda e: rx.text(e["credits"], " expire on ", e["date"], size="2"),
                ),
                id="expiring-credits",
                spacing="1",
            ),
        ),
        spacing="3",
        width="100%",
    )


def _allowance() -> rx.Component:
    return rx.cond(
        CreditsState.allowance_size > 0,
        rx.vstack(
            rx.hstack(
                rx.text(
                    "Used ",
                    CreditsState.allowance_used_text,
                    " of ",
                    CreditsState.allowance_size_text,
                    " credits since ",
                    CreditsState.allowance_since,
                    size="2",
                ),
                rx.spacer(),
                rx.text(CreditsState.allowance_percent, "%", size="2", id="allowance-percent"),
                width="100%",
            ),
            rx.progress(
                value=CreditsState.allowance_percent,
                max=100,
                id="allowance-bar",
                aria_label="Share of this allowance used",
            ),
            width="100%",
            spacing="1",
        ),
    )


def _usage(models: list[str]) -> rx.Component:
    bars = [
        rx.recharts.bar(data_key=m, stack_id="usage", fill=CHART_COLORS[i % len(CHART_COLORS)])
        for i, m in enumerate(models)
    ]
    return rx.cond(
        CreditsState.has_usage,
        rx.vstack(
            rx.box(
                rx.recharts.bar_chart(
                    *bars,
                    rx.recharts.x_axis(data_key="day"),
                    rx.recharts.y_axis(),
                    rx.recharts.graphing_tooltip(),
                    rx.recharts.legend(),
                    data=CreditsState.usage_chart,
                    height=240,
                ),
                width="100%",
                id="usage-chart",
            ),
            rx.box(
                scroll_region(
                    rx.table.root(
                        rx.table.header(
                            rx.table.row(
                                *[
                                    rx.table.column_header_cell(h)
                                    for h in (
                                        "Model",
                                        "Calls",
                                        "Tokens in",
                                        "Tokens out",
                                        "Credits",
                                    )
                                ]
                            )
                        ),
                        rx.table.body(
                            rx.foreach(
                                CreditsState.model_rows,
                                lambda r: rx.table.row(
                                    rx.table.cell(r["model"]),
                                    rx.table.cell(r["calls"]),
                                    rx.table.cell(r["input"]),
                                    rx.table.cell(r["output"]),
                                    rx.table.cell(r["credits"]),
                                ),
                            )
                        ),
                        id="usage-by-model",
                    ),
                    label="Usage by model",
                ),
                width="100%",
                overflow_x="auto",
            ),
            width="100%",
        ),
        rx.text(
            "No usage in the last 30 days. Your chats will show up here.",
            color_scheme="gray",
            id="usage-empty",
        ),
    )


def _ledger_row(row: Any) -> rx.Component:
    return rx.table.row(
        rx.table.cell(row["date"], white_space="nowrap"),
        rx.table.cell(rx.badge(row["kind"])),
        rx.table.cell(row["amount"], white_space="nowrap"),
        rx.table.cell(row["balance_after"]),
        rx.table.cell(
            row["reason"],
            rx.cond(
                row["receipt_url"] != "",
                rx.link(" · receipt", href=row["receipt_url"], is_external=True),
            ),
        ),
    )


def _ledger_history(export_url: str) -> rx.Component:
    return rx.vstack(
        rx.hstack(
            rx.select.root(
                rx.select.trigger(id="history-kind", aria_label="Show entries of kind"),
                rx.select.content(*(rx.select.item(kind, value=kind) for kind in HISTORY_KINDS)),
                value=CreditsState.history_kind,
                on_change=CreditsState.show_history,
            ),
            rx.spacer(),
            rx.link(
                rx.button(rx.icon("download", size=14), "Export CSV", variant="soft"),
                href=export_url,
                id="export-csv",
            ),
            width="100%",
            wrap="wrap",
        ),
        rx.cond(
            CreditsState.history_rows.length() > 0,  # type: ignore[attr-defined]
            rx.box(
                scroll_region(
                    rx.table.root(
                        rx.table.header(
                            rx.table.row(
                                *[
                                    rx.table.column_header_cell(h)
                                    for h in ("Date (UTC)", "Kind", "Credits", "Balance", "Details")
                                ]
                            )
                        ),
                        rx.table.body(rx.foreach(CreditsState.history_rows, _ledger_row)),
                        id="ledger-history",
                    ),
                    label="History",
                ),
                width="100%",
                overflow_x="auto",
            ),
            rx.text("Nothing here yet.", color_scheme="gray", id="ledger-history-empty"),
        ),
        rx.hstack(
            rx.button(
                "Newer",
                variant="soft",
                disabled=CreditsState.history_page <= 1,
                on_click=CreditsState.turn_history_page(-1),  # type: ignore[operator]
                id="history-newer",
            ),
            rx.text(
                "Page ", CreditsState.history_page, " of ", CreditsState.history_pages, size="2"
            ),
            rx.button(
                "Older",
                variant="soft",
                disabled=CreditsState.history_page >= CreditsState.history_pages,
                on_click=CreditsState.turn_history_page(1),  # type: ignore[operator]
                id="history-older",
            ),
            align="center",
        ),
        width="100%",
    )


def credits() -> rx.Component:
    settings = get_settings()  # at render time: this deployment's addresses and models
    action = f"{settings.api_url}/checkout/start"
    return page(
        rx.heading("Credits", size="6"),
        trial_notice(),
        _balance(),
        _allowance(),
        plan_section(f"{settings.api_url}/billing/subscribe", f"{settings.api_url}/billing/portal"),
        rx.cond(CreditsState.simulated, _simulated_notice()),
        rx.heading("Buy credits", size="4"),
        rx.flex(
            rx.foreach(CreditsState.packs, lambda p: _pack_card(p, action)),
            spacing="4",
            wrap="wrap",
        ),
        auto_topup_section(),
        rx.heading("Usage, last 30 days", size="4"),
        _usage([m.id for m in settings.models]),
        rx.heading("History", size="4"),
        _ledger_history(f"{settings.api_url}/credits/export.csv"),
        rx.heading("Purchases", size="4"),
        _history(),
        rx.heading("Invoices", size="4"),
        invoice_list(),
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
