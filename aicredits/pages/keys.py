"""Personal API keys: create a named key (shown once), see them all, revoke one."""

from __future__ import annotations

from typing import Any

import reflex as rx

from aicredits.components.layout import page, scroll_region
from aicredits.settings import get_settings
from aicredits.state.keys import MAX_ACTIVE_KEYS, MAX_NAME_LENGTH, KeysState

_SNIPPET_STYLE = {
    "font_family": "var(--code-font-family)",
    "font_size": "0.85em",
    "background": "var(--gray-a3)",
    "border_radius": "var(--radius-3)",
    "padding": "0.75em 1em",
    "margin": "0",
    "width": "max-content",
    "min_width": "100%",
    "white_space": "pre",
}


def _usage(api_url: str, model: str) -> rx.Component:
    curl = (
        f"curl {api_url}/v1/chat/completions \\\n"
        '  -H "Authorization: Bearer aic_..." \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"""  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}]}}'"""
    )
    python = (
        "from openai import OpenAI\n\n"
        f'api_url = "{api_url}"\n'
        'client = OpenAI(base_url=f"{api_url}/v1", api_key="aic_...")\n'
        "reply = client.chat.completions.create(\n"
        f'    model="{model}", messages=[{{"role": "user", "content": "Hi"}}]\n'
        ")"
    )
    return rx.vstack(
        rx.text(
            "A personal key lets your own programs call the OpenAI-compatible API as you. "
            "Their calls spend your credits, like the chat does. Keep keys secret, and "
            "revoke any key you no longer use or that may have leaked: it stops working at once."
        ),
        scroll_region(rx.el.pre(curl, id="usage-curl", style=_SNIPPET_STYLE), label="With curl"),
        scroll_region(
            rx.el.pre(python, id="usage-python", style=_SNIPPET_STYLE), label="With Python"
        ),
        spacing="3",
        width="100%",
    )


def _create_form() -> rx.Component:
    return rx.form(
        rx.flex(
            rx.input(
                name="name",
                id="key-name-input",
                placeholder="Name, e.g. laptop script",
                max_length=MAX_NAME_LENGTH,
                auto_complete="off",
                size="3",
                flex="1 1 14em",
            ),
            rx.button("Create key", type="submit", id="create-key", size="3"),
            spacing="3",
            wrap="wrap",
            width="100%",
        ),
        on_submit=KeysState.create,
        reset_on_submit=True,
        width="100%",
        id="create-key-form",
    )


def _new_key() -> rx.Component:
    return rx.callout.root(
        rx.callout.icon(rx.icon("key_round")),
        rx.vstack(
            rx.text(
                "Your new key. Copy it now: it is shown only this once, and is not kept "
                "anywhere on this site.",
                weight="medium",
            ),
            rx.code(
                KeysState.new_key_secret,
                id="new-key-secret",
                size="3",
                word_break="break-all",  # one long token: let it wrap on a phone
            ),
            rx.hstack(
                rx.button(
                    rx.icon("copy", size=16),
                    "Copy",
                    on_click=rx.set_clipboard(KeysState.new_key_secret),
                    variant="soft",
                    id="copy-new-key",
                ),
                rx.button("Done", on_click=KeysState.dismiss_new_key, id="dismiss-new-key"),
                spacing="3",
            ),
            spacing="3",
            width="100%",
            min_width="0",
        ),
        color_scheme="green",
        id="new-key",
        width="100%",
    )


def _revoke_button(key: Any) -> rx.Component:  # an ObjectVar at compile time
    return rx.alert_dialog.root(
        rx.alert_dialog.trigger(
            rx.button(
                "Revoke",
                color_scheme="red",
                variant="soft",
                size="1",
                id=rx.Var.create("revoke-") + key["id"],
            ),
        ),
        rx.alert_dialog.content(
            rx.alert_dialog.title("Revoke this key?"),
            rx.alert_dialog.description(
                "Programs using ",
                rx.text.strong(key["name"]),
                " (",
                rx.code(key["prefix"]),
                ") stop working at once. This cannot be undone.",
            ),
            rx.flex(
                rx.alert_dialog.cancel(
                    rx.button("Cancel", variant="soft", color_scheme="gray", id="cancel-revoke"),
                ),
                rx.alert_dialog.action(
                    rx.button(
                        "Revoke key",
                        color_scheme="red",
                        # mypy cannot follow rx.event's overloads to EventCallback.
                        on_click=KeysState.revoke(key["id"]),  # type: ignore[operator]
                        id=rx.Var.create("confirm-revoke-") + key["id"],
                    ),
                ),
                spacing="3",
                justify="end",
                margin_top="1em",
            ),
            max_width="28em",
        ),
    )


def _key_row(key: Any) -> rx.Component:
    return rx.table.row(
        rx.table.cell(key["name"]),
        rx.table.cell(rx.code(key["prefix"]), white_space="nowrap"),
        rx.table.cell(key["created"], white_space="nowrap"),
        rx.table.cell(key["last_used"], white_space="nowrap"),
        rx.table.cell(
            rx.badge(
                key["status"],
                color_scheme=rx.cond(key["status"] == "active", "green", "gray"),
            )
        ),
        rx.table.cell(rx.cond(key["status"] == "active", _revoke_button(key))),
        id=rx.Var.create("key-") + key["id"],
    )


def _keys_table() -> rx.Component:
    return rx.cond(
        KeysState.keys.length() > 0,  # type: ignore[attr-defined]
        scroll_region(
            rx.table.root(
                rx.table.header(
                    rx.table.row(
                        rx.table.column_header_cell("Name"),
                        rx.table.column_header_cell("Key"),
                        rx.table.column_header_cell("Created"),
                        rx.table.column_header_cell("Last used"),
                        rx.table.column_header_cell("Status"),
                        rx.table.column_header_cell(""),
                    )
                ),
                rx.table.body(rx.foreach(KeysState.keys, _key_row)),
                id="keys-table",
                width="100%",
                max_width="100%",
                overflow_x="auto",
            ),
            label="Your API keys",
        ),
        rx.text("No keys yet.", id="keys-empty", color_scheme="gray"),
    )


def keys_page() -> rx.Component:
    settings = get_settings()  # at render time: the URL this deployment is reached at
    return page(
        rx.heading("API keys", size="6"),
        _usage(settings.api_url, settings.models[0].id if settings.models else "MODEL"),
        rx.heading("Create a key", size="4"),
        rx.text(
            f"Up to {MAX_ACTIVE_KEYS} active keys. Name each one after where it is used.",
            size="2",
            color_scheme="gray",
        ),
        _create_form(),
        rx.cond(
            KeysState.error != "",
            rx.callout(KeysState.error, icon="triangle_alert", color_scheme="red", id="keys-error"),
        ),
        rx.cond(KeysState.new_key_secret != "", _new_key()),
        rx.heading("Your keys", size="4"),
        _keys_table(),
        signed_in_only=True,
    )
