"""The frame every page shares: a header with who is signed in, their credits, sign-out."""

from __future__ import annotations

from typing import Any

import reflex as rx
from reflex_components_core.el.elements.base import BaseHTML

from aicredits.settings import get_settings
from aicredits.state.session import SessionState


class PostForm(BaseHTML):
    """A <form> the browser submits itself. Reflex's rx.el.form always cancels the submit to
    run a State handler, but signing in and out must be real requests to the backend."""

    tag = "form"
    action: rx.Var[str]
    method: rx.Var[str]


def sign_in_button(provider: Any, next_path: Any = "/chat") -> rx.Component:
    """A real form post to the backend: starting a sign-in changes state, so never a GET."""
    return PostForm.create(
        rx.el.input(type="hidden", name="next", value=next_path),
        rx.button(
            "Sign in with ",
            provider["label"],
            type="submit",
            size="3",
            width="100%",
            id=rx.Var.create("sign-in-") + provider["name"],
        ),
        action=provider["action"],
        method="post",
        width="100%",
    )


def sign_out_button(element_id: str = "sign-out") -> rx.Component:
    return PostForm.create(
        rx.button(
            "Sign out", type="submit", variant="soft", size="2", id=element_id, white_space="nowrap"
        ),
        action=f"{get_settings().api_url}/auth/logout",
        method="post",
    )


# The header's balance follows the usage warnings: neutral, then information at the first
# threshold (50%), a warning at 80%, danger when the credits are gone.
BADGE_COLOR = rx.match(
    SessionState.usage_level, ("info", "blue"), ("warning", "amber"), ("blocking", "red"), "gray"
)
NAV_LINKS = (("Chat", "/chat", "nav-chat"), ("Credits", "/credits", "nav-credits"))


def _balance_badge() -> rx.Component:
    return rx.badge(
        rx.text(SessionState.balance_text, id="header-balance", white_space="nowrap"),
        size="2",
        color_scheme=BADGE_COLOR,
        high_contrast=True,
        class_name=rx.Var.create("balance-badge usage-") + SessionState.usage_level,
    )


def _theme_toggle() -> rx.Component:
    return rx.color_mode.button(
        size="2", variant="ghost", aria_label="Switch between light and dark", id="theme-toggle"
    )


def _desktop_nav() -> rx.Component:
    return rx.hstack(
        *(rx.link(label, href=href, id=ident) for label, href, ident in NAV_LINKS),
        rx.link("API keys", href="/keys", id="nav-keys"),
        rx.cond(SessionState.is_admin, rx.link("Admin", href="/admin", id="nav-admin")),
        spacing="4",
        display=["none", "none", "flex"],
    )


def _desktop_user() -> rx.Component:
    return rx.hstack(
        rx.avatar(
            src=SessionState.avatar_url,
            fallback=SessionState.user_initial,
            size="2",
            radius="full",
            alt="",
        ),
        rx.text(
            SessionState.user_name,
            id="header-user-name",
            size="2",
            weight="medium",
            max_width="16em",
            overflow="hidden",
            text_overflow="ellipsis",
            white_space="nowrap",
        ),
        sign_out_button(),
        align="center",
        spacing="3",
        display=["none", "none", "flex"],
    )


def _phone_menu() -> rx.Component:
    """Below the desktop width the links and the account collapse into one menu."""
    return rx.box(
        rx.menu.root(
            rx.menu.trigger(
                rx.icon_button(
                    rx.icon("menu"), variant="soft", size="2", aria_label="Menu", id="menu-button"
                )
            ),
            rx.menu.content(
                *(
                    rx.menu.item(rx.link(label, href=href, width="100%"), id=f"menu-{ident}")
                    for label, href, ident in (*NAV_LINKS, ("API keys", "/keys", "nav-keys"))
                ),
                rx.cond(
                    SessionState.is_admin,
                    rx.menu.item(rx.link("Admin", href="/admin", width="100%"), id="menu-admin"),
                ),
                rx.menu.separator(),
                rx.text(
                    SessionState.user_name,
                    id="menu-user-name",
                    size="2",
                    color_scheme="gray",
                    padding_x="0.5em",
                ),
                rx.box(sign_out_button("menu-sign-out"), padding_x="0.5em", padding_y="0.25em"),
                align="end",
            ),
        ),
        display=["block", "block", "none"],
    )


def header() -> rx.Component:
    return rx.hstack(
        rx.link(
            rx.text("aicredits", size="5", weight="bold"),
            href="/",
            underline="none",
            id="home-link",
        ),
        rx.cond(SessionState.signed_in, _desktop_nav()),
        rx.spacer(),
        rx.cond(
            SessionState.signed_in,
            rx.hstack(
                _balance_badge(),
                _desktop_user(),
                _theme_toggle(),
                _phone_menu(),
                align="center",
                spacing="3",
            ),
            rx.hstack(
                _theme_toggle(),
                rx.link(rx.button("Sign in", variant="soft"), href="/login", id="header-sign-in"),
                align="center",
                spacing="3",
            ),
        ),
        align="center",
        width="100%",
        padding_y="0.75em",
        border_bottom="1px solid var(--gray-a5)",
        spacing="4",
        as_="header",
    )


def usage_banner() -> rx.Component:
    """The usage warning, on every page: informs at 50%, warns at 80%, blocks at 100%."""
    return rx.cond(
        SessionState.banner_level != "",
        rx.callout.root(
            rx.callout.icon(rx.icon("gauge")),
            rx.callout.text(
                SessionState.banner_text,
                " ",
                rx.link("Buy credits", href="/credits", weight="bold", id="banner-buy"),
            ),
            rx.cond(
                SessionState.banner_dismissible,
                rx.button(
                    "Dismiss",
                    variant="ghost",
                    size="1",
                    on_click=SessionState.dismiss_banner,
                    id="banner-dismiss",
                ),
            ),
            color_scheme=rx.match(
                SessionState.banner_level, ("info", "blue"), ("warning", "amber"), "red"
            ),
            id="usage-banner",
            class_name=rx.Var.create("usage-banner banner-") + SessionState.banner_level,
            width="100%",
        ),
    )


def topup_banner() -> rx.Component:
    """What went wrong with auto top-up, on every page, with a way to buy the pack on
    Stripe's page when the bank wants the customer there."""
    checkout_action = f"{get_settings().api_url}/checkout/start"
    return rx.cond(
        SessionState.topup_notice_kind != "",
        rx.callout.root(
            rx.callout.icon(rx.icon("credit_card")),
            rx.callout.text(
                SessionState.topup_notice_text,
                " ",
                rx.link(
                    "Auto top-up settings",
                    href="/credits#auto-topup",
                    weight="bold",
                    id="topup-notice-settings",
                ),
                id="topup-notice-text",
            ),
            rx.hstack(
                rx.cond(
                    SessionState.topup_notice_kind == "action_required",
                    PostForm.create(
                        rx.el.input(
                            type="hidden", name="pack", value=SessionState.topup_notice_pack
                        ),
                        rx.button(
                            "Pay on Stripe's page",
                            type="submit",
                            size="1",
                            id="topup-finish-paying",
                        ),
                        action=checkout_action,
                        method="post",
                    ),
                ),
                rx.button(
                    "Dismiss",
                    variant="ghost",
                    size="1",
                    on_click=SessionState.dismiss_topup_notice,
                    id="topup-notice-dismiss",
                ),
                align="center",
            ),
            color_scheme=rx.match(SessionState.topup_notice_kind, ("cap_reached", "amber"), "red"),
            id="topup-notice",
            class_name=rx.Var.create("topup-notice topup-notice-") + SessionState.topup_notice_kind,
            width="100%",
        ),
    )


def trial_notice() -> rx.Component:
    """Why this account got no free trial (it was created past its address's daily limit),
    on the pages a new user lands on, until the account first gets credits."""
    return rx.cond(
        SessionState.trial_notice != "",
        rx.callout.root(
            rx.callout.icon(rx.icon("info")),
            rx.callout.text(
                SessionState.trial_notice,
                " ",
                rx.link("Buy credits", href="/credits", weight="bold", id="trial-notice-buy"),
            ),
            color_scheme="amber",
            id="trial-notice",
            width="100%",
        ),
    )


def page(*children: rx.Component, signed_in_only: bool = False) -> rx.Component:
    """A page in the shared frame. Signed-in-only content renders once the server has
    resolved the session, so a signed-out visitor never sees it, not even for a moment."""
    body = rx.vstack(*children, spacing="4", width="100%", padding_y="1.5em")
    if signed_in_only:
        body = rx.cond(SessionState.signed_in, body, rx.center(rx.spinner(), padding="4em"))
    # Present once the page's state has loaded (its on_load done): what a test waits for.
    ready = rx.cond(rx.State.is_hydrated, rx.el.span(id="page-ready", hidden=True))
    return rx.container(
        rx.vstack(header(), usage_banner(), topup_banner(), body, ready, width="100%"), size="3"
    )


def scroll_region(child: rx.Component, *, label: str, **props: Any) -> rx.Component:
    """A wide thing (a table, a code sample) that scrolls sideways inside its own box on a
    narrow screen, instead of widening the page; the box takes keyboard focus, so it can be
    scrolled without a mouse, and is named for screen readers."""
    return rx.box(
        child, class_name="scroll-region", tab_index=0, role="region", aria_label=label, **props
    )


def list_table(
    rows: Any,
    headers: list[str],
    render_row: Any,
    *,
    table_id: str,
    label: str,
    empty: rx.Component | None = None,
) -> rx.Component:
    """A list of rows (a list Var) as a table in its own scroll region, with its column
    headers; `empty` (if given) stands in when there are no rows."""
    table = scroll_region(
        rx.table.root(
            rx.table.header(rx.table.row(*[rx.table.column_header_cell(h) for h in headers])),
            rx.table.body(rx.foreach(rows, render_row)),
            id=table_id,
            width="100%",
        ),
        label=label,
    )
    return rx.cond(rows.length() > 0, table, empty if empty is not None else rx.fragment())


def labelled(label: str, control: rx.Component, **props: Any) -> rx.Component:
    """A form control with its visible label, tied to it (the label wraps it)."""
    return rx.el.label(
        rx.vstack(rx.text(label, size="2", weight="medium"), control, spacing="1"),
        width="100%",
        **props,
    )
