"""The chat page: conversations, the streaming reply, its cost, and errors shown in place."""

from __future__ import annotations

from typing import Any

import reflex as rx

from aicredits.components.layout import page, trial_notice
from aicredits.state.chat import INPUT_ID, ChatState, ConversationsState


def _conversation_item(conversation: Any) -> rx.Component:
    # Reads only ConversationsState: a streamed reply (a ChatState update) leaves it alone.
    selected = ConversationsState.conversation_id == conversation["id"]
    return rx.hstack(
        rx.button(
            rx.text(
                conversation["title"],
                trim="end",
                size="2",
                text_align="left",
                width="100%",
                overflow="hidden",
                text_overflow="ellipsis",
                white_space="nowrap",
            ),
            variant=rx.cond(selected, "soft", "ghost"),
            on_click=ChatState.open_conversation(conversation["id"]),  # type: ignore[operator]
            flex="1",
            justify="start",
            min_width="0",
            class_name="conversation-link",
        ),
        _rename_dialog(conversation),
        _delete_dialog(conversation),
        spacing="1",
        width="100%",
        align="center",
        # Keyed by the conversation, not its place: a conversation moving to the top after
        # a reply re-renders no other row.
        key=conversation["id"],
    )


def _rename_dialog(conversation: Any) -> rx.Component:
    return rx.dialog.root(
        rx.dialog.trigger(
            rx.icon_button(
                rx.icon("pencil", size=14), variant="ghost", size="1", aria_label="Rename"
            )
        ),
        rx.dialog.content(
            rx.dialog.title("Rename conversation"),
            rx.form(
                rx.vstack(
                    rx.input(type="hidden", name="conversation_id", value=conversation["id"]),
                    rx.input(
                        name="title",
                        default_value=conversation["title"],
                        max_length=120,
                        required=True,
                        class_name="rename-input",
                    ),
                    rx.hstack(
                        rx.dialog.close(rx.button("Cancel", variant="soft", type="button")),
                        rx.dialog.close(rx.button("Save", type="submit")),
                        justify="end",
                        width="100%",
                    ),
                ),
                on_submit=ChatState.rename_conversation,
            ),
        ),
    )


def _delete_dialog(conversation: Any) -> rx.Component:
    return rx.alert_dialog.root(
        rx.alert_dialog.trigger(
            rx.icon_button(
                rx.icon("trash_2", size=14),
                variant="ghost",
                size="1",
                color_scheme="red",
                aria_label="Delete",
            )
        ),
        rx.alert_dialog.content(
            rx.alert_dialog.title("Delete this conversation?"),
            rx.alert_dialog.description(
                "Its messages are deleted. What its replies cost stays in your credit history."
            ),
            rx.hstack(
                rx.alert_dialog.cancel(rx.button("Cancel", variant="soft")),
                rx.alert_dialog.action(
                    rx.button(
                        "Delete",
                        color_scheme="red",
                        on_click=ChatState.delete_conversation(conversation["id"]),  # type: ignore[operator]
                    )
                ),
                justify="end",
                spacing="3",
            ),
        ),
    )


def _conversation_list() -> rx.Component:
    return rx.vstack(
        rx.button(
            rx.icon("plus", size=16),
            "New chat",
            on_click=ChatState.new_conversation,
            width="100%",
            id="new-chat",
        ),
        rx.cond(
            ConversationsState.conversations.length() > 0,  # type: ignore[attr-defined]
            rx.vstack(
                rx.foreach(ConversationsState.conversations, _conversation_item),
                spacing="1",
                width="100%",
                id="conversation-list",
            ),
            rx.text("No conversations yet.", size="2", color_scheme="gray"),
        ),
        width="100%",
        spacing="3",
    )


@rx.memo
def reply_markdown(content: rx.Var[str]) -> rx.Component:
    """A reply rendered as Markdown, in a component of its own: the Markdown renderer reads the
    color mode with a React hook, and called straight inside the list it would add a hook per
    message, so React would see the list's hooks change as replies arrive."""
    return rx.markdown(content)


def _message(message: Any) -> rx.Component:
    is_user = message["role"] == "user"
    return rx.box(
        rx.cond(
            is_user,
            rx.text(message["content"], white_space="pre-wrap"),
            rx.vstack(
                reply_markdown(content=message["content"]),
                rx.cond(message["streaming"], rx.spinner(size="1")),
                rx.cond(
                    message["meta"] != "",
                    rx.text(
                        message["meta"], size="1", color_scheme="gray", class_name="reply-cost"
                    ),
                ),
                rx.cond(
                    message["note"] != "",
                    rx.badge(message["note"], color_scheme="amber", class_name="reply-note"),
                ),
                spacing="1",
                align="start",
            ),
        ),
        class_name=rx.cond(is_user, "message message-user", "message message-assistant"),
        key=message["id"],
        align_self=rx.cond(is_user, "end", "start"),
        background=rx.cond(is_user, "var(--accent-3)", "var(--gray-2)"),
        padding="0.75em 1em",
        border_radius="12px",
        max_width="100%",
        overflow_x="auto",
    )


def _error() -> rx.Component:
    return rx.cond(
        ChatState.error != "",
        rx.callout.root(
            rx.callout.icon(rx.icon("circle_alert")),
            rx.callout.text(
                ChatState.error,
                rx.cond(
                    ChatState.error_kind == "credits",
                    rx.link(" Buy credits", href="/credits", id="buy-credits-link", weight="bold"),
                ),
            ),
            color_scheme=rx.cond(ChatState.error_kind == "credits", "amber", "red"),
            id="chat-error",
            width="100%",
        ),
    )


def _composer() -> rx.Component:
    return rx.form(
        rx.vstack(
            rx.text_area(
                name="message",
                id=INPUT_ID,
                placeholder="Message the model… (Enter sends, Shift+Enter for a new line)",
                enter_key_submit=True,
                disabled=ChatState.banner_level == "blocking",
                on_change=ChatState.draft_changed.debounce(300),  # type: ignore[attr-defined]
                rows="3",
                width="100%",
                max_length=50_000,
            ),
            rx.hstack(
                rx.text(ChatState.estimate_text, size="1", color_scheme="gray", id="cost-estimate"),
                rx.spacer(),
                rx.cond(
                    ChatState.streaming,
                    rx.button(
                        rx.icon("square", size=14),
                        "Stop",
                        type="button",
                        color_scheme="red",
                        variant="soft",
                        on_click=ChatState.stop,
                        id="stop-button",
                    ),
                ),
                rx.button(
                    "Send",
                    type="submit",
                    disabled=ChatState.streaming | (ChatState.banner_level == "blocking"),
                    id="send-button",
                ),
                width="100%",
                align="center",
                wrap="wrap",
            ),
            width="100%",
            spacing="2",
        ),
        on_submit=ChatState.send,
        width="100%",
    )


def _model_picker() -> rx.Component:
    # The trigger shows only the label, so it fits a phone; the prices of the selected model
    # are on their own line under the picker, at every width.
    return rx.vstack(
        rx.select.root(
            rx.select.trigger(
                placeholder="Model",
                id="model-picker",
                aria_label="Model",
                width="100%",
                max_width="100%",
                overflow="hidden",
                # The trigger repeats the selected item's text: there, only its label.
                style={"& .model-item-prices": {"display": "none"}},
            ),
            rx.select.content(
                rx.foreach(
                    ChatState.models,
                    lambda m: rx.select.item(
                        m["label"],
                        rx.text.span(" · " + m["prices"], class_name="model-item-prices"),
                        value=m["id"],
                    ),
                )
            ),
            value=ChatState.model,
            on_change=ChatState.pick_model,
            disabled=ChatState.streaming,
        ),
        rx.text(
            ChatState.model_prices,
            size="1",
            color_scheme="gray",
            id="model-prices",
        ),
        flex="1",
        min_width="0",
        spacing="1",
    )


def chat() -> rx.Component:
    mobile_conversations = rx.drawer.root(
        rx.drawer.trigger(rx.button(rx.icon("menu", size=16), "Conversations", variant="soft")),
        rx.drawer.overlay(),
        rx.drawer.portal(
            rx.drawer.content(
                rx.box(_conversation_list(), padding="1em"),
                background="var(--color-background)",
                width="85vw",
                height="100%",
            )
        ),
        direction="left",
    )
    return page(
        rx.hstack(
            rx.box(
                _conversation_list(),
                width="16em",
                flex_shrink="0",
                display=["none", "none", "block"],
            ),
            rx.vstack(
                # On a phone the conversations button sits above the picker, which then
                # has the whole width for the model's name.
                rx.flex(
                    rx.box(mobile_conversations, display=["block", "block", "none"]),
                    _model_picker(),
                    direction=rx.breakpoints(initial="column", md="row"),
                    gap="2",
                    width="100%",
                    align=rx.breakpoints(initial="start", md="center"),
                ),
                trial_notice(),
                rx.cond(
                    ChatState.messages.length() > 0,  # type: ignore[attr-defined]
                    rx.vstack(
                        rx.foreach(ChatState.messages, _message),
                        width="100%",
                        spacing="3",
                        id="messages",
                    ),
                    rx.text(
                        "Ask anything. Each reply shows what it cost.",
                        color_scheme="gray",
                        id="empty-chat",
                    ),
                ),
                _error(),
                rx.cond(
                    ChatState.banner_level == "blocking",
                    # callout.text is a <p>: its parts are inline, never another <p>.
                    rx.callout.root(
                        rx.callout.icon(rx.icon("lock")),
                        rx.callout.text(
                            "Chat is paused: you have used all your credits. ",
                            rx.link("Buy credits", href="/credits", weight="bold"),
                            " to keep chatting.",
                        ),
                        color_scheme="red",
                        id="chat-blocked",
                    ),
                ),
                _composer(),
                width="100%",
                min_width="0",
                spacing="4",
            ),
            width="100%",
            align="start",
            spacing="5",
        ),
        signed_in_only=True,
    )
