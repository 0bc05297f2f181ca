"""The admin console: overview, users, one user's page with its actions, the audit log,
prices and payments. Every page and every handler behind it checks the admin role on the server
(state/admin.py); these components only lay the data out."""

from __future__ import annotations

from typing import Any

import reflex as rx

from aicredits.components.layout import labelled, page, scroll_region
from aicredits.state.admin import (
    AdminAuditLogState,
    AdminOverviewState,
    AdminPageState,
    AdminPaymentsState,
    AdminPricesState,
    AdminUserAccountState,
    AdminUserSearchState,
)

Column = tuple[str, str]  # (header, key in the row dict)


def _nav() -> rx.Component:
    return rx.hstack(
        rx.link("Overview", href="/admin", id="admin-nav-overview"),
        rx.link("Users", href="/admin/users", id="admin-nav-users"),
        rx.link("Audit log", href="/admin/audit", id="admin-nav-audit"),
        rx.link("Prices", href="/admin/prices", id="admin-nav-prices"),
        rx.link("Payments", href="/admin/payments", id="admin-nav-payments"),
        spacing="4",
        padding_bottom="0.5em",
        border_bottom="1px solid var(--gray-a4)",
        width="100%",
    )


def _messages() -> rx.Component:
    return rx.fragment(
        rx.cond(
            AdminPageState.error != "",
            rx.callout(
                AdminPageState.error, icon="triangle_alert", color_scheme="red", id="admin-error"
            ),
        ),
        rx.cond(
            AdminPageState.notice != "",
            rx.callout(
                AdminPageState.notice, icon="check", color_scheme="green", id="admin-notice"
            ),
        ),
    )


def _admin_page(title: str, *children: rx.Component) -> rx.Component:
    return page(
        rx.heading(title, size="6"),
        _nav(),
        _messages(),
        *children,
        signed_in_only=True,
    )


def _cell(row: Any, key: str) -> rx.Component:
    return rx.table.cell(row[key])


def _table(
    rows: Any,
    columns: list[Column],
    *,
    table_id: str,
    empty: str,
    row_id: str = "",
    link: Column | None = None,
) -> rx.Component:
    """A table of display rows (dicts of strings). `link` makes one column a link to the
    row's `href`."""

    def render(row: Any) -> rx.Component:
        cells = []
        for _header, key in columns:
            if link is not None and key == link[1]:
                cells.append(rx.table.cell(rx.link(row[key], href=row["href"])))
            else:
                cells.append(_cell(row, key))
        extra: dict[str, Any] = {}
        if row_id:
            extra["id"] = rx.Var.create(f"{row_id}-") + row["id"]
        return rx.table.row(*cells, **extra)

    return rx.cond(
        rows.length() > 0,
        scroll_region(
            rx.table.root(
                rx.table.header(
                    rx.table.row(*[rx.table.column_header_cell(h) for h, _ in columns])
                ),
                rx.table.body(rx.foreach(rows, render)),
                id=table_id,
                width="100%",
                size="1",
            ),
            label=table_id.removeprefix("admin-").replace("-", " ").capitalize(),
            width="100%",
        ),
        rx.text(empty, color_scheme="gray", id=f"{table_id}-empty"),
    )


def _pager(page_var: Any, pages_var: Any, previous: Any, next_: Any, name: str) -> rx.Component:
    return rx.hstack(
        rx.button(
            "Previous",
            on_click=previous,
            disabled=page_var <= 1,
            variant="soft",
            id=f"{name}-previous",
        ),
        rx.text("Page ", page_var, " of ", pages_var, id=f"{name}-page"),
        rx.button(
            "Next",
            on_click=next_,
            disabled=page_var >= pages_var,
            variant="soft",
            id=f"{name}-next",
        ),
        align="center",
        spacing="3",
    )


def _token() -> rx.Component:
    """The form's one-time token: a form submitted twice is applied once."""
    return rx.el.input(type="hidden", name="form_token", value=AdminPageState.form_token)


def _target_id() -> rx.Component:
    return rx.el.input(type="hidden", name="user_id", value=AdminUserAccountState.target["id"])


def _field(label: str, control: rx.Component) -> rx.Component:
    return labelled(label, control)


# --- overview ---------------------------------------------------------------------------------


def overview() -> rx.Component:
    return _admin_page(
        "Admin",
        rx.text(
            "Users: ",
            rx.text.strong(AdminOverviewState.user_count, id="admin-user-count"),
            " · last 30 days: ",
            AdminOverviewState.window,
        ),
        rx.grid(
            rx.foreach(
                AdminOverviewState.totals,
                lambda t: rx.card(
                    rx.text(t["label"], size="2", color_scheme="gray"),
                    rx.heading(t["value"], size="5", id=rx.Var.create("total-") + t["id"]),
                ),
            ),
            columns="3",
            spacing="3",
            width="100%",
        ),
        rx.heading("Upstream cost by model", size="4"),
        _table(
            AdminOverviewState.usage_by_model,
            [
                ("Model", "model"),
                ("Calls", "calls"),
                ("Tokens", "tokens"),
                ("Cost (credits)", "cost"),
                ("Charged", "charged"),
                ("Unbilled", "unbilled"),
            ],
            table_id="admin-usage-by-model",
            empty="No calls in the last 30 days.",
        ),
        rx.heading("Top spenders", size="4"),
        _table(
            AdminOverviewState.top_spenders,
            [("User", "user"), ("Spent (credits)", "spent")],
            table_id="admin-top-spenders",
            empty="Nobody has spent credits in the last 30 days.",
            link=("User", "user"),
        ),
        rx.heading("Spike alerts", size="4"),
        rx.text("A user appears here when they ", AdminOverviewState.spike_rule, ".", size="2"),
        _table(
            AdminOverviewState.spikes,
            [("User", "user"), ("Last hour", "last_hour"), ("Usual per hour", "usual")],
            table_id="admin-spikes",
            empty="No spikes right now.",
            row_id="spike",
            link=("User", "user"),
        ),
        rx.heading("Sign-ups past the free trial limit", size="4"),
        rx.text(AdminOverviewState.trial_rule, size="2"),
        _table(
            AdminOverviewState.limited_addresses,
            [
                ("Address", "address"),
                ("Day (UTC)", "day"),
                ("Accounts with a trial", "granted"),
                ("Accounts refused", "refused"),
            ],
            table_id="admin-limited-addresses",
            empty="No address reached the limit in the last 30 days.",
            row_id="limited",
        ),
    )


# --- users ------------------------------------------------------------------------------------


def users() -> rx.Component:
    return _admin_page(
        "Users",
        rx.form(
            rx.hstack(
                rx.input(
                    name="q",
                    placeholder="Email, name or user id",
                    default_value=AdminUserSearchState.user_query,
                    id="admin-user-search",
                    width="24em",
                ),
                rx.button("Search", type="submit", id="admin-user-search-submit"),
                spacing="2",
            ),
            on_submit=AdminUserSearchState.search_users,
        ),
        rx.text(AdminUserSearchState.users_total, " users", size="2", id="admin-users-total"),
        _table(
            AdminUserSearchState.users,
            [
                ("Email", "email"),
                ("Name", "name"),
                ("Balance", "balance"),
                ("Held", "held"),
                ("Purchased", "purchased"),
                ("Last activity", "last_activity"),
                ("Flags", "flags"),
            ],
            table_id="admin-users",
            empty="No user matches.",
            row_id="admin-user",
            link=("Email", "email"),
        ),
        _pager(
            AdminUserSearchState.users_page,
            AdminUserSearchState.users_pages,
            AdminUserSearchState.users_previous_page,
            AdminUserSearchState.users_next_page,
            "users",
        ),
    )


# --- one user ---------------------------------------------------------------------------------


def _adjust_form() -> rx.Component:
    return rx.form(
        rx.vstack(
            rx.heading("Adjust the balance", size="3"),
            _token(),
            _target_id(),
            _field(
                "Credits (signed: -50 takes, 200 adds)",
                rx.input(name="credits", id="adjust-credits", required=True),
            ),
            _field(
                "Reason (required, kept in the ledger and the audit log)",
                rx.input(name="reason", id="adjust-reason", required=True),
            ),
            rx.button("Adjust", type="submit", id="adjust-submit"),
            spacing="2",
        ),
        on_submit=AdminUserAccountState.adjust_balance,
    )


def _grant_form() -> rx.Component:
    return rx.form(
        rx.vstack(
            rx.heading("Grant promotional credits", size="3"),
            _token(),
            _target_id(),
            _field("Credits", rx.input(name="credits", id="grant-credits", required=True)),
            _field(
                "Expires after (days, empty: never)",
                rx.input(name="expires_in_days", id="grant-days"),
            ),
            _field("Reason", rx.input(name="reason", id="grant-reason", required=True)),
            rx.button("Grant", type="submit", id="grant-submit"),
            spacing="2",
        ),
        on_submit=AdminUserAccountState.grant_credits,
    )


def _suspension_form() -> rx.Component:
    def form(title: str, text: str, handler: Any, button: rx.Component) -> rx.Component:
        return rx.form(
            rx.vstack(
                rx.heading(title, size="3"),
                rx.text(text, size="2"),
                _token(),
                _target_id(),
                _field("Reason", rx.input(name="reason", id="suspension-reason", required=True)),
                button,
                spacing="2",
            ),
            on_submit=handler,
        )

    return rx.cond(
        AdminUserAccountState.target["suspended"] == "yes",
        form(
            "Unsuspend",
            "Lets the user sign in again. Their old sessions and API keys stay revoked.",
            AdminUserAccountState.unsuspend_user,
            rx.button("Unsuspend", type="submit", id="unsuspend-submit"),
        ),
        form(
            "Suspend",
            "Signs the user out everywhere and revokes their API keys.",
            AdminUserAccountState.suspend_user,
            rx.button("Suspend", type="submit", color_scheme="red", id="suspend-submit"),
        ),
    )


def _clear_cell(row: Any, kind: str, handler: Any) -> rx.Component:
    """An open item's "Clear" form (a note is required; the handler audits it), or when it
    was cleared. The form sends `{kind}_id`; its controls' ids are `{kind}-note-{id}` and
    `{kind}-clear-{id}`."""
    return rx.table.cell(
        rx.cond(
            row["open"] == "yes",
            rx.form(
                rx.hstack(
                    _token(),
                    rx.el.input(type="hidden", name=f"{kind}_id", value=row["id"]),
                    rx.input(
                        name="note",
                        placeholder="Note (required)",
                        required=True,
                        aria_label="Note",
                        id=rx.Var.create(f"{kind}-note-") + row["id"],
                    ),
                    rx.button(
                        "Clear",
                        type="submit",
                        size="1",
                        id=rx.Var.create(f"{kind}-clear-") + row["id"],
                    ),
                    spacing="2",
                ),
                on_submit=handler,
            ),
            rx.text(row["cleared"], size="2"),
        )
    )


def _flag_row(flag: Any) -> rx.Component:
    return rx.table.row(
        rx.table.cell(flag["created"]),
        rx.table.cell(flag["kind"]),
        rx.table.cell(flag["amount"]),
        rx.table.cell(flag["detail"]),
        _clear_cell(flag, "flag", AdminUserAccountState.clear_flag),
        id=rx.Var.create("flag-") + flag["id"],
    )


def _flags() -> rx.Component:
    return rx.cond(
        AdminUserAccountState.flags.length() > 0,  # type: ignore[attr-defined]
        rx.table.root(
            rx.table.header(
                rx.table.row(
                    *[
                        rx.table.column_header_cell(h)
                        for h in ("Raised", "Flag", "Credits", "Detail", "")
                    ]
                )
            ),
            rx.table.body(rx.foreach(AdminUserAccountState.flags, _flag_row)),
            id="admin-flags",
            width="100%",
            size="1",
        ),
        rx.text("No flags.", color_scheme="gray", id="admin-flags-empty"),
    )


def _summary() -> rx.Component:
    t = AdminUserAccountState.target
    return rx.card(
        rx.vstack(
            rx.heading(t["email"], size="5", id="admin-target-email"),
            rx.text(t["name"]),
            rx.hstack(
                rx.text("Balance ", rx.text.strong(t["balance"], id="admin-target-balance")),
                rx.text("Held ", rx.text.strong(t["held"])),
                rx.text("Available ", rx.text.strong(t["available"])),
                rx.text("Purchased ", rx.text.strong(t["purchased"])),
                spacing="4",
                wrap="wrap",
            ),
            rx.text("Joined ", t["created"], " · last activity ", t["last_activity"], size="2"),
            rx.cond(
                t["flags"] != "",
                rx.badge(t["flags"], color_scheme="red", id="admin-target-flags"),
            ),
            spacing="2",
        ),
        width="100%",
    )


def user_page() -> rx.Component:
    return _admin_page(
        "User",
        rx.cond(
            AdminUserAccountState.target.contains("id"),  # type: ignore[attr-defined]
            rx.vstack(
                _summary(),
                rx.grid(
                    rx.card(_adjust_form()),
                    rx.card(_grant_form()),
                    rx.card(_suspension_form()),
                    columns="3",
                    spacing="3",
                    width="100%",
                ),
                rx.heading("Flags", size="4"),
                _flags(),
                rx.heading("Auto top-up", size="4"),
                _table(
                    AdminUserAccountState.topup_settings,
                    [("Setting", "setting"), ("Value", "value")],
                    table_id="admin-topup-settings",
                    empty="Never set up.",
                    row_id="admin-topup-setting",
                ),
                _table(
                    AdminUserAccountState.topup_history,
                    [
                        ("Date", "date"),
                        ("Pack", "pack"),
                        ("Amount", "amount"),
                        ("Credits", "credits"),
                        ("Status", "status"),
                        ("Why", "failure"),
                        ("PaymentIntent", "payment_intent"),
                    ],
                    table_id="admin-topups",
                    empty="No auto top-ups.",
                    row_id="admin-topup",
                ),
                rx.heading("Ledger", size="4"),
                _table(
                    AdminUserAccountState.ledger,
                    [
                        ("Date", "date"),
                        ("Kind", "kind"),
                        ("Credits", "amount"),
                        ("Balance after", "balance_after"),
                        ("By", "actor"),
                        ("Reason", "reason"),
                    ],
                    table_id="admin-ledger",
                    empty="No ledger entries.",
                    row_id="admin-ledger",
                ),
                rx.heading("Credits that will expire", size="4"),
                _table(
                    AdminUserAccountState.expiring,
                    [("Expires", "date"), ("Credits", "credits")],
                    table_id="admin-expiring",
                    empty="Nothing expires.",
                ),
                rx.heading("Holds", size="4"),
                _table(
                    AdminUserAccountState.holds,
                    [
                        ("Created", "created"),
                        ("Request", "request_id"),
                        ("Held", "amount"),
                        ("Status", "status"),
                        ("Charged", "charged"),
                        ("Expires", "expires"),
                    ],
                    table_id="admin-holds",
                    empty="No holds.",
                ),
                rx.heading("Purchases", size="4"),
                _table(
                    AdminUserAccountState.purchases,
                    [
                        ("Date", "date"),
                        ("Pack", "pack"),
                        ("Paid", "amount"),
                        ("Credits", "credits"),
                        ("Status", "status"),
                        ("Clawed back", "clawed_back"),
                        ("Shortfall", "shortfall"),
                    ],
                    table_id="admin-purchases",
                    empty="No purchases.",
                ),
                rx.heading("Usage", size="4"),
                _table(
                    AdminUserAccountState.usage,
                    [
                        ("Date", "date"),
                        ("Model", "model"),
                        ("Price version", "price_version"),
                        ("Tokens", "tokens"),
                        ("Cost", "cost"),
                        ("Charged", "charged"),
                        ("Unbilled", "unbilled"),
                        ("Outcome", "outcome"),
                    ],
                    table_id="admin-usage",
                    empty="No calls yet.",
                ),
                rx.heading("Admin actions on this user", size="4"),
                _table(
                    AdminUserAccountState.user_audit,
                    [("When", "date"), ("Who", "actor"), ("What", "detail"), ("Why", "reason")],
                    table_id="admin-user-audit",
                    empty="No admin actions yet.",
                ),
                spacing="3",
                width="100%",
            ),
        ),
    )


# --- audit log --------------------------------------------------------------------------------


def audit() -> rx.Component:
    return _admin_page(
        "Audit log",
        rx.text(
            "Every admin action, newest first. The log is append-only: the database refuses "
            "to change or delete its rows.",
            size="2",
        ),
        _table(
            AdminAuditLogState.audit,
            [
                ("When", "date"),
                ("Who", "actor"),
                ("Action", "action"),
                ("User", "target"),
                ("What", "detail"),
                ("Why", "reason"),
            ],
            table_id="admin-audit",
            empty="No admin actions yet.",
            row_id="audit",
        ),
        _pager(
            AdminAuditLogState.audit_page,
            AdminAuditLogState.audit_pages,
            AdminAuditLogState.audit_previous_page,
            AdminAuditLogState.audit_next_page,
            "audit",
        ),
    )


# --- prices -----------------------------------------------------------------------------------


def prices() -> rx.Component:
    return _admin_page(
        "Prices",
        rx.text(
            "Credits per million tokens. A new version applies to calls from its start; "
            "past usage keeps the version it was priced with.",
            size="2",
        ),
        _table(
            AdminPricesState.current_prices,
            [
                ("Model", "model"),
                ("Input", "input"),
                ("Output", "output"),
                ("Since", "since"),
                ("Scheduled", "scheduled"),
                ("Served", "configured"),
            ],
            table_id="admin-current-prices",
            empty="No prices.",
        ),
        rx.card(
            rx.form(
                rx.vstack(
                    rx.heading("Add a price version", size="3"),
                    _token(),
                    _field(
                        "Model",
                        rx.el.select(
                            rx.foreach(
                                AdminPricesState.model_ids, lambda m: rx.el.option(m, value=m)
                            ),
                            name="model",
                            id="price-model",
                        ),
                    ),
                    rx.hstack(
                        _field(
                            "Input credits / 1M tokens",
                            rx.input(name="input_per_mtok", id="price-input", required=True),
                        ),
                        _field(
                            "Output credits / 1M tokens",
                            rx.input(name="output_per_mtok", id="price-output", required=True),
                        ),
                        spacing="3",
                    ),
                    _field(
                        "Effective from (UTC; empty: now)",
                        rx.input(name="effective_from", type="datetime-local", id="price-from"),
                    ),
                    _field("Reason", rx.input(name="reason", id="price-reason", required=True)),
                    rx.button("Add version", type="submit", id="price-submit"),
                    spacing="2",
                ),
                on_submit=AdminPricesState.add_price,
            ),
            width="100%",
        ),
        rx.heading("All versions", size="4"),
        _table(
            AdminPricesState.price_versions,
            [
                ("Version", "id"),
                ("Model", "model"),
                ("Input", "input"),
                ("Output", "output"),
                ("From", "from"),
                ("Status", "status"),
                ("By", "by"),
            ],
            table_id="admin-price-versions",
            empty="No versions.",
            row_id="price-version",
        ),
    )


# --- payments ---------------------------------------------------------------------------------


def _last_run() -> rx.Component:
    run = AdminPaymentsState.last_run
    return rx.cond(
        AdminPaymentsState.last_run.length() > 0,  # type: ignore[attr-defined]
        rx.vstack(
            rx.text(
                "Last run ",
                run["started"],
                " by ",
                run["trigger"],
                " (finished ",
                run["finished"],
                "), over payments since ",
                run["since"],
                ": checked ",
                run["checked"],
                "; ",
                run["found"],
                " discrepancies, ",
                run["fixed"],
                " fixed.",
                id="reconciliation-summary",
                size="2",
            ),
            rx.cond(
                run["error"] != "",
                rx.callout(run["error"], icon="triangle_alert", color_scheme="red"),
            ),
            _table(
                AdminPaymentsState.last_run_items,
                [
                    ("Kind", "kind"),
                    ("Checkout Session", "session"),
                    ("What", "detail"),
                    ("", "fixed"),
                ],
                table_id="admin-reconciliation",
                empty="No discrepancy: Stripe and this app agree.",
            ),
            width="100%",
        ),
        rx.text("Reconciliation has not run yet.", color_scheme="gray", id="reconciliation-none"),
    )


def _unmatched_row(row: Any) -> rx.Component:
    return rx.table.row(
        rx.table.cell(row["created"]),
        rx.table.cell(row["session"]),
        rx.table.cell(row["paid"]),
        rx.table.cell(row["reason"]),
        rx.table.cell(row["detail"]),
        rx.table.cell(row["source"]),
        _clear_cell(row, "unmatched", AdminPaymentsState.clear_unmatched),
        id=rx.Var.create("unmatched-") + row["id"],
    )


def _unmatched() -> rx.Component:
    return rx.cond(
        AdminPaymentsState.unmatched.length() > 0,  # type: ignore[attr-defined]
        scroll_region(
            rx.table.root(
                rx.table.header(
                    rx.table.row(
                        *[
                            rx.table.column_header_cell(h)
                            for h in ("Seen", "Checkout Session", "Paid", "Why", "Detail", "By", "")
                        ]
                    )
                ),
                rx.table.body(rx.foreach(AdminPaymentsState.unmatched, _unmatched_row)),
                id="admin-unmatched",
                width="100%",
                size="1",
            ),
            label="Unmatched payments",
            width="100%",
        ),
        rx.text("No unmatched payments.", color_scheme="gray", id="admin-unmatched-empty"),
    )


def payments() -> rx.Component:
    return _admin_page(
        "Payments",
        rx.text(
            "Credits come only from Checkout Sessions this app created, at their pack's price. "
            "A payment that matches none credited nothing and is listed below for you to "
            "deal with at Stripe (refund it, or credit the user by hand), then clear with a "
            "note. Reconciliation sets Stripe's sessions and refunds of the last week against "
            "the purchases once a day, crediting any payment that was missed.",
            size="2",
        ),
        rx.heading("Reconciliation with Stripe", size="4"),
        _last_run(),
        rx.form(
            _token(),
            rx.button("Run reconciliation now", type="submit", id="reconcile-now"),
            on_submit=AdminPaymentsState.run_reconciliation,
        ),
        rx.heading(
            "Unmatched payments (",
            AdminPaymentsState.open_unmatched,
            " open)",
            size="4",
            id="unmatched-heading",
        ),
        _unmatched(),
    )
