"""The chat page's state. Thin: each handler checks the user, calls a service, and sets what
the page shows. The reply streams from a background event with short `async with self`
blocks, so the state lock is never held while waiting on the model."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import reflex as rx
from reflex_base.event import EventSpec

from aicredits.domain.errors import (
    AICreditsError,
    InsufficientCredits,
    LimiterUnavailable,
    RateLimited,
    answer_for,
)
from aicredits.domain.money import credits_text, grouped
from aicredits.domain.pricing import credits_per_1k
from aicredits.services import chat, conversations
from aicredits.services.chat import ChatReply, Estimate
from aicredits.services.conversations import (
    STREAMING,
    ConversationView,
    MessageView,
    UnknownConversation,
)
from aicredits.services.gateway import (
    ReplyCut,
    ServerRestarting,
    TurnResult,
    UpstreamFailed,
    UpstreamRefused,
    shared_gateway,
)
from aicredits.services.runtime import get_database, run_blocking
from aicredits.services.subscriptions import PlanPastDue, QuotaExceeded
from aicredits.settings import get_settings
from aicredits.state.session import SessionState

INPUT_ID = "chat-input"
PUSH_SECONDS = 0.05


def cost_line(input_tokens: int, output_tokens: int, charged: int, estimated: bool) -> str:
    """The line under a reply: what it used and what it cost."""
    counted = " (counted locally)" if estimated else ""
    noun = "credit" if charged == 1 else "credits"
    return (
        f"{grouped(input_tokens)} tokens in · {grouped(output_tokens)} out{counted} · "
        f"{grouped(charged)} {noun}"
    )


def outcome_note(outcome: str) -> str:
    return {
        "stopped": "Stopped: you paid only for what was shown.",
        "cut": "The model broke off: you paid only for what was shown.",
        "interrupted": "Cut by a server restart: you paid only for what was shown.",
        "lost": "Cut off when the server stopped unexpectedly: you paid at most for what "
        "was shown.",
        "streaming": "Still being written. If it stops, the part shown is all you pay for.",
    }.get(outcome, "")


# What a person is told of each error, above the message box: (kind, message), the message
# formatted with the error as `exc`. The most specific class listed here wins.
ERROR_MESSAGES: dict[type[AICreditsError], tuple[str, str]] = {
    InsufficientCredits: (
        "credits",
        "Not enough credits: this message needs up to {exc.needed:,} and you have "
        "{exc.available:,} available.",
    ),
    QuotaExceeded: (
        "credits",
        "Your {exc.plan} plan's credits for this month are used up: they reset on "
        "{exc.resets_on}. Upgrade your plan or buy a pack to go on now.",
    ),
    PlanPastDue: (
        "credits",
        "The last payment for your {exc.plan} plan failed, so it is paused: update your card "
        "with “Manage billing” on the credits page.",
    ),
    RateLimited: ("rate", "You are sending too fast: try again in {exc.retry_after_header} s."),
    LimiterUnavailable: ("rate", "The service is busy: try again in a few seconds."),
    UpstreamFailed: ("upstream", "The model did not answer. Nothing was charged; try again."),
    # A refusal a retry would meet again: the gateway's message says which.
    UpstreamRefused: ("upstream", "{exc}"),
    ServerRestarting: (
        "upstream",
        "The server is restarting. Nothing was charged; send again in a few seconds.",
    ),
    AICreditsError: ("invalid", "{exc}"),
}


def describe_error(exc: AICreditsError) -> tuple[str, str]:
    """(kind, message) for an error shown in place, above the message box."""
    kind, message = answer_for(ERROR_MESSAGES, exc)
    return kind, message.format(exc=exc)


def message_row(
    role: str,
    content: str,
    meta: str = "",
    note: str = "",
    streaming: bool = False,
    message_id: int = 0,
) -> dict[str, Any]:
    return {
        "id": message_id,
        "role": role,
        "content": content,
        "meta": meta,
        "note": note,
        "streaming": streaming,
    }


def message_rows(messages: list[MessageView]) -> list[dict[str, Any]]:
    """Stored messages as the page shows them: a finished reply with its cost and note, one
    still being written as streaming."""
    return [
        message_row(
            m.role,
            m.content,
            cost_line(m.input_tokens, m.output_tokens, m.credits_charged, m.estimated)
            if m.role == "assistant" and m.outcome != STREAMING
            else "",
            outcome_note(m.outcome),
            streaming=m.outcome == STREAMING,
            message_id=m.id,
        )
        for m in messages
    ]


def conversation_row(conversation: ConversationView) -> dict[str, str]:
    return {"id": str(conversation.id), "title": conversation.title}


def estimate_line(result: Estimate | None) -> str:
    """The line under the box: "≈ N credits, at most M", or why the draft cannot be sent
    ("" when no model is chosen)."""
    if result is None:
        return ""
    return result.problem or (
        f"≈ {credits_text(result.approx_credits)}, at most {grouped(result.max_credits)}"
    )


def with_reply_text(rows: list[dict[str, Any]], reply_id: int, text: str) -> bool:
    """Show `text` as the reply `reply_id` so far. False when the row is not on the page
    (the user opened another conversation, or reloaded into another)."""
    for index, row in enumerate(rows):
        if row["id"] == reply_id:
            rows[index] = {**row, "content": text}
            return True
    return False


def as_conversation_id(value: str) -> int | None:
    """The open conversation's id as the services take it: None for a new, unsaved one."""
    return int(value) if value else None


def model_row(
    model_id: str, label: str, input_per_mtok: int, output_per_mtok: int
) -> dict[str, str]:
    """A model as the picker shows it: its label, and its prices in credits per 1K tokens."""
    given, taken = credits_per_1k(input_per_mtok), credits_per_1k(output_per_mtok)
    return {
        "id": model_id,
        "label": label or model_id,
        "prices": f"{given} in / {taken} out per 1K tokens",
        "price_line": f"Credits per 1K tokens: {given} input, {taken} output",
    }


def price_line(model: str, models: list[dict[str, str]]) -> str:
    """The line under the picker: the selected model's prices ("" when none is selected)."""
    return next((m["price_line"] for m in models if m["id"] == model), "")


class ConversationsState(SessionState):
    """The sidebar: the user's conversations and which one is open.

    Apart from ChatState on purpose: Reflex re-renders the components that read a state's
    vars whenever that state changes, and a streamed reply changes ChatState every
    PUSH_SECONDS. Kept here, the list (each row with its rename and delete dialogs) is
    rendered again only when the list or the open conversation changes. ChatState's handlers
    set these through `get_state`; this state has no handlers of its own."""

    conversations: list[dict[str, str]] = []
    conversation_id: str = ""  # "": a new, unsaved conversation


class ChatState(SessionState):
    messages: list[dict[str, Any]] = []
    models: list[dict[str, str]] = []
    model: str = ""
    estimate_text: str = ""
    _draft: str = ""  # what the box holds, as last reported
    streaming: bool = False
    error: str = ""
    error_kind: str = ""
    _stop_requested: bool = False

    @rx.var
    def model_prices(self) -> str:
        return price_line(self.model, self.models)

    async def _sidebar(self) -> ConversationsState:
        return await self.get_state(ConversationsState)

    # --- loading ------------------------------------------------------------------------------

    async def _refresh_conversations(self, user_id: int) -> None:
        (await self._sidebar()).conversations = await _fetch_conversations(user_id)

    async def _open(self, user_id: int, conversation_id: int) -> None:
        messages, model = await _fetch_opened(user_id, conversation_id)
        (await self._sidebar()).conversation_id = str(conversation_id)
        self.messages = messages
        if any(m["id"] == model for m in self.models):
            self.model = model

    async def _start_new(self) -> None:
        (await self._sidebar()).conversation_id = ""
        self.messages = []

    @rx.event
    async def load(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        page = await run_blocking(
            chat.chat_page,
            get_database(),
            get_settings(),
            user_id=user.id,
            model=self.model,
            wanted=str(self.router.url.query_parameters.get("c", "")),
        )
        self._show_balance(page.available, page.usage)
        self.trial_notice = page.trial_notice
        self.models = [
            model_row(m.id, m.label, m.price.input_per_mtok, m.price.output_per_mtok)
            for m in page.models
        ]
        self.model = page.model
        self.error = self.error_kind = ""
        self.streaming = False
        sidebar = await self._sidebar()
        sidebar.conversations = [conversation_row(c) for c in page.conversations]
        sidebar.conversation_id = str(page.opened.id) if page.opened else ""
        self.messages = message_rows(page.messages)
        self.estimate_text = ""  # the box is empty: nothing to estimate
        self._draft = ""
        return None

    # --- conversations -----------------------------------------------------------------------

    @rx.event
    async def open_conversation(self, conversation_id: str) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        if self.streaming:
            return None
        try:
            await self._open(user.id, int(conversation_id))
        except (UnknownConversation, ValueError):
            self.error_kind, self.error = "invalid", "That conversation does not exist."
            return None
        self.error = self.error_kind = ""
        return _remember((await self._sidebar()).conversation_id)

    @rx.event
    async def new_conversation(self) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        if self.streaming:
            return None
        await self._start_new()
        self.error = self.error_kind = ""
        await self._update_estimate(user.id, "")
        return _remember("")

    @rx.event
    async def rename_conversation(self, form_data: dict[str, Any]) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        try:
            await run_blocking(
                conversations.rename_conversation,
                get_database(),
                user_id=user.id,
                conversation_id=int(form_data.get("conversation_id", 0)),
                title=str(form_data.get("title", "")),
            )
        except (AICreditsError, ValueError) as exc:
            self.error_kind, self.error = "invalid", str(exc)
            return None
        await self._refresh_conversations(user.id)
        return None

    @rx.event
    async def delete_conversation(self, conversation_id: str) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        if self.streaming:
            return None
        try:
            await run_blocking(
                conversations.delete_conversation,
                get_database(),
                user_id=user.id,
                conversation_id=int(conversation_id),
            )
        except (UnknownConversation, ValueError):
            self.error_kind, self.error = "invalid", "That conversation does not exist."
            return None
        sidebar = await self._sidebar()
        if conversation_id == sidebar.conversation_id:
            await self._start_new()
        await self._refresh_conversations(user.id)
        return _remember(sidebar.conversation_id)

    # --- composing ------------------------------------------------------------------------------

    async def _update_estimate(self, user_id: int, draft: str) -> None:
        """The line under the box: what sending the draft would cost; nothing for an empty
        box."""
        self._draft = draft
        if not draft.strip():
            self.estimate_text = ""
            return
        conversation_id = as_conversation_id((await self._sidebar()).conversation_id)
        self.estimate_text = await _fetch_estimate(user_id, self.model, conversation_id, draft)

    @rx.event
    async def draft_changed(self, draft: str) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        await self._update_estimate(user.id, draft)
        return None

    @rx.event
    async def pick_model(self, model: str) -> EventSpec | None:
        user = await self._authenticate()
        if user is None:
            return self._to_login()
        if any(m["id"] == model for m in self.models) and not self.streaming:
            self.model = model
            await self._update_estimate(user.id, self._draft)
        return None

    @rx.event
    def stop(self) -> None:
        # Only ends this tab's own stream; the charge is decided by what was delivered.
        self._stop_requested = True

    @rx.event(background=True)
    async def send(self, form_data: dict[str, Any]) -> AsyncIterator[Any]:
        """Every database read happens outside `async with self`: other events of this tab
        wait for the state's lock, so it is held only to read and assign values."""
        text = str(form_data.get("message", "")).strip()
        async with self:
            session_key = self._session_key()
            ip = self.router.session.client_ip or None
        user = await self._fetch_user(*session_key)
        async with self:
            self._show(user)
            refused = user is None or self.streaming or not text or not self.model
            if user is not None and not refused:
                self.streaming = True  # one reply at a time, whatever the browser sends
                self._stop_requested = False
                self.error = self.error_kind = ""
            model = self.model
            conversation_id = as_conversation_id((await self._sidebar()).conversation_id)
            to_login = self._to_login() if user is None else None
        if to_login is not None:
            yield to_login
            return
        if refused or user is None:
            return
        db = get_database()
        try:
            reply = await chat.start_reply(
                shared_gateway(get_settings(), db),
                db,
                user_id=user.id,
                ip=ip,
                conversation_id=conversation_id,
                model=model,
                text=text,
            )
        except AICreditsError as exc:
            async with self:
                self.error_kind, self.error = describe_error(exc)
                self.streaming = False
            return  # the message stays in the box
        # The question is stored: the sidebar and the address bar show its conversation now,
        # so a reload in the middle of the reply comes back to it.
        exchange = reply.exchange
        listed = await _fetch_conversations(user.id)
        async with self:
            self.messages = [
                *self.messages,
                message_row("user", text, message_id=exchange.question_id),
                message_row("assistant", "", streaming=True, message_id=exchange.reply_id),
            ]
            sidebar = await self._sidebar()
            sidebar.conversation_id = str(exchange.conversation_id)
            if sidebar.conversations != listed:
                sidebar.conversations = listed
        yield rx.set_value(INPUT_ID, "")
        yield _remember(str(exchange.conversation_id))
        result, failure = await self._stream_reply(reply)
        replied = result is not None and not chat.nothing_delivered(result)
        # Read everything the page shows next before taking the state's lock.
        listed = await _fetch_conversations(user.id)
        balance = await self._fetch_balance(user.id)
        shown_id = str(exchange.conversation_id if replied else conversation_id or "")
        # A message that goes back in the box gets its estimate again; after a reply the
        # box is empty, and so is the line under it.
        estimate = (
            ""
            if replied
            else await _fetch_estimate(user.id, model, as_conversation_id(shown_id), text)
        )
        async with self:
            self.streaming = False
            sidebar = await self._sidebar()
            if sidebar.conversations != listed:  # each assignment re-renders the sidebar
                sidebar.conversations = listed
            self._show_balance(*balance)
            self.estimate_text, self._draft = estimate, "" if replied else text
            if result is None or not replied:
                # Nothing was delivered or charged, and the question was withdrawn: it goes
                # back in the box, with why.
                gone = {exchange.question_id, exchange.reply_id}
                self.messages = [m for m in self.messages if m["id"] not in gone]
                self.error_kind = "upstream"
                self.error = failure or "The model did not answer. Nothing was charged."
                if sidebar.conversation_id == str(exchange.conversation_id):
                    sidebar.conversation_id = shown_id
                restore: list[Any] = [rx.set_value(INPUT_ID, text), _remember(shown_id)]
            else:
                for index, row in enumerate(self.messages):
                    if row["id"] == exchange.reply_id:
                        self.messages[index] = message_row(
                            "assistant",
                            result.text,
                            cost_line(
                                result.input_tokens,
                                result.output_tokens,
                                result.charged,
                                result.estimated,
                            ),
                            outcome_note(result.outcome),
                            message_id=exchange.reply_id,
                        )
                restore = []
        for event in restore:
            yield event

    async def _stream_reply(self, reply: ChatReply) -> tuple[TurnResult | None, str]:
        """Show the reply as it arrives; stop when asked. The page is updated at most every
        PUSH_SECONDS, so a fast model does not flood the websocket with one update per
        token. Each update carries the whole reply so far, so a page reloaded meanwhile
        (which shows what was stored) is brought up to date, not doubled."""
        turn, reply_id = reply.turn, reply.exchange.reply_id
        shown: list[str] = []
        last_push = 0.0
        pushed = 0

        async def push() -> bool:
            nonlocal last_push, pushed
            async with self:
                with_reply_text(self.messages, reply_id, "".join(shown))
                stop = self._stop_requested
            pushed = len(shown)
            last_push = time.monotonic()
            return stop

        try:
            async with contextlib.aclosing(turn.stream()) as replies:
                async for piece in replies:
                    shown.append(piece)
                    if time.monotonic() - last_push >= PUSH_SECONDS and await push():
                        break
                if len(shown) > pushed:
                    await push()
        except ReplyCut as cut:
            return cut.result, ""
        except (UpstreamFailed, ServerRestarting) as exc:
            return turn.result, describe_error(exc)[1]
        return turn.result, ""


async def _fetch_opened(user_id: int, conversation_id: int) -> tuple[list[dict[str, Any]], str]:
    """A conversation's messages as the page shows them, and the model it last used."""
    rows = await run_blocking(
        conversations.get_messages,
        get_database(),
        user_id=user_id,
        conversation_id=conversation_id,
    )
    opened = await run_blocking(
        conversations.get_conversation,
        get_database(),
        user_id=user_id,
        conversation_id=conversation_id,
    )
    return message_rows(rows), opened.model


async def _fetch_conversations(user_id: int) -> list[dict[str, str]]:
    rows = await run_blocking(conversations.list_conversations, get_database(), user_id=user_id)
    return [conversation_row(c) for c in rows]


async def _fetch_estimate(user_id: int, model: str, conversation_id: int | None, draft: str) -> str:
    result = await run_blocking(
        chat.draft_estimate,
        get_database(),
        get_settings(),
        user_id=user_id,
        conversation_id=conversation_id,
        model=model,
        draft=draft,
    )
    return estimate_line(result)


def _remember(conversation_id: str) -> EventSpec:
    """Keep the open conversation in the address bar, so a reload comes back to it."""
    url = f"/chat?c={int(conversation_id)}" if conversation_id else "/chat"
    return rx.call_script(f"window.history.replaceState(null, '', {url!r})")
