"""Signed-in pages whose real content arrives with later issues: the credits dashboard and
the admin console. They already enforce who may see them."""

from __future__ import annotations

import reflex as rx

from aicredits.components.layout import page
from aicredits.state.admin import AdminState


def admin() -> rx.Component:
    return page(
        rx.heading("Admin", size="6"),
        rx.text("Users: ", rx.text.strong(AdminState.user_count, id="admin-user-count")),
        signed_in_only=True,
    )
