"""Sign-in and refusal pages."""

from __future__ import annotations

import reflex as rx

from aicredits.components.layout import page, sign_in_button
from aicredits.state.login import LoginState


def login() -> rx.Component:
    return page(
        rx.center(
            rx.card(
                rx.vstack(
                    rx.heading("Sign in to aicredits", size="6"),
                    rx.text("Your first sign-in creates your account with free trial credits."),
                    rx.foreach(
                        LoginState.providers, lambda p: sign_in_button(p, LoginState.next_path)
                    ),
                    rx.cond(
                        LoginState.dev_sign_in,
                        rx.callout(
                            "Dev sign-in is a local test identity provider: pick or type any "
                            "test user, no real account is needed. It is off as soon as a "
                            "real provider is configured, and never runs in production.",
                            icon="flask_conical",
                            color_scheme="amber",
                            id="dev-sign-in-notice",
                        ),
                    ),
                    spacing="4",
                    width="100%",
                ),
                width="100%",
                max_width="26em",
            ),
            width="100%",
            padding_top="3em",
        )
    )


def forbidden() -> rx.Component:
    return page(
        rx.callout(
            "This page is for administrators. Your account is not an admin account.",
            icon="shield_alert",
            color_scheme="red",
            id="forbidden",
        ),
        rx.link("Back to the chat", href="/chat"),
    )
