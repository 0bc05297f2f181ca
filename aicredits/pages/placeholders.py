"""Signed-in pages whose real content arrives with later issues: the chat, the credits
dashboard and the admin console. They already enforce who may see them."""

from __future__ import annotations

import reflex as rx

from aicredits.components.layout import page
from aicredits.state.admin import AdminState
from aicredits.state.session import SessionState


def chat() -> rx.Component:
    return page(
        rx.heading("Chat", size="6"),
        rx.text("Signed in as ", rx.text.strong(SessionState.user_email), id="chat-signed-in-as"),
        rx.callout(
            "The chat arrives with the next release: the metered gateway comes first.",
            icon="message_square",
        ),
        signed_in_only=True,
    )


def credits() -> rx.Component:
    return page(
        rx.heading("Credits", size="6"),
        rx.text("Available: ", rx.text.strong(SessionState.available_credits), " credits"),
        signed_in_only=True,
    )


def admin() -> rx.Component:
    return page(
        rx.heading("Admin", size="6"),
        rx.text("Users: ", rx.text.strong(AdminState.user_count, id="admin-user-count")),
        signed_in_only=True,
    )
