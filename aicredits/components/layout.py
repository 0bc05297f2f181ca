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


def sign_out_button() -> rx.Component:
    return PostForm.create(
        rx.button("Sign out", type="submit", variant="soft", size="2", id="sign-out"),
        action=f"{get_settings().api_url}/auth/logout",
        method="post",
    )


def _user_menu() -> rx.Component:
    return rx.hstack(
        rx.badge(
            rx.text(SessionState.available_credits, " credits", id="header-balance"),
            size="2",
            color_scheme="green",
        ),
        rx.avatar(
            src=SessionState.avatar_url,
            fallback=SessionState.user_initial,
            size="2",
            radius="full",
        ),
        rx.text(SessionState.user_name, id="header-user-name", size="2", weight="medium"),
        sign_out_button(),
        align="center",
        spacing="3",
    )


def header() -> rx.Component:
    return rx.hstack(
        rx.link(rx.heading("aicredits", size="5"), href="/", underline="none"),
        rx.cond(
            SessionState.signed_in,
            rx.hstack(
                rx.link("Chat", href="/chat"),
                rx.link("Credits", href="/credits"),
                rx.link("API keys", href="/keys", id="nav-keys"),
                rx.cond(SessionState.is_admin, rx.link("Admin", href="/admin", id="nav-admin")),
                spacing="4",
            ),
        ),
        rx.spacer(),
        rx.cond(
            SessionState.signed_in,
            _user_menu(),
            rx.link(rx.button("Sign in", variant="soft"), href="/login"),
        ),
        align="center",
        width="100%",
        padding_y="0.75em",
        border_bottom="1px solid var(--gray-a5)",
        wrap="wrap",
        spacing="4",
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
    return rx.container(rx.vstack(header(), usage_banner(), body, width="100%"), size="3")
