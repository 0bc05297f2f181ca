"""The chat page's use cases: what it shows on load, what the next message would cost, and
one metered reply in a stored conversation. The gateway does the metering; this module
builds the prompt from the conversation and keeps the exchange in it: the question is stored
before the model is called, the reply as it streams (with the gateway's checkpoints) and
finished with its cost when the turn settles, whatever becomes of the page that asked."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from aicredits.adapters.blocking import run_blocking
from aicredits.adapters.db import Database
from aicredits.domain.chat import ChatRequest
from aicredits.domain.errors import AICreditsError, InvalidRequest, UnknownModel
from aicredits.domain.pricing import Price, usage_cost
from aicredits.services import conversations, ledger, pricing, thresholds, trials
from aicredits.services.conversations import ConversationView, Exchange, MessageView, Reply
from aicredits.services.gateway import Gateway, Turn, TurnResult
from aicredits.settings import Settings

# "≈" assumes a reply of this many tokens (or the model's cap, if lower); "at most" assumes
# the cap, which is what is reserved.
TYPICAL_REPLY_TOKENS = 300
MAX_PROMPT_CHARS = 50_000


@dataclass(frozen=True, slots=True)
class Estimate:
    prompt_tokens: int
    approx_credits: int
    max_credits: int
    # Why the message cannot be sent as it is (too long), or "" when it can.
    problem: str = ""


def _history(
    target: Database | Connection, user_id: int, conversation_id: int | None
) -> list[dict[str, Any]]:
    if conversation_id is None:
        return []
    return [
        {"role": m.role, "content": m.content}
        for m in conversations.get_messages(
            target, user_id=user_id, conversation_id=conversation_id
        )
        if m.content
    ]


def prompt_messages(
    target: Database | Connection, *, user_id: int, conversation_id: int | None, text: str
) -> list[dict[str, Any]]:
    """The whole conversation so far plus the new message: what the model is sent."""
    return [*_history(target, user_id, conversation_id), {"role": "user", "content": text}]


def estimate(
    target: Database | Connection,
    settings: Settings,
    *,
    user_id: int,
    conversation_id: int | None,
    model: str,
    draft: str,
) -> Estimate:
    """What sending `draft` would cost, with the same pricing the gateway reserves by."""
    spec = settings.model_spec(model)
    if spec is None:
        raise UnknownModel(f"model {model!r} is not offered here")
    price = pricing.current_price(target, model=model)
    messages = prompt_messages(target, user_id=user_id, conversation_id=conversation_id, text=draft)
    try:
        quote = pricing.quote_worst_case(price, spec, messages=messages, max_tokens=None)
    except InvalidRequest as exc:
        return Estimate(prompt_tokens=0, approx_credits=0, max_credits=0, problem=str(exc))
    approx = usage_cost(
        price,
        input_tokens=quote.prompt_tokens,
        output_tokens=min(TYPICAL_REPLY_TOKENS, quote.max_output_tokens),
    )
    return Estimate(
        prompt_tokens=quote.prompt_tokens, approx_credits=approx, max_credits=quote.credits
    )


def draft_estimate(
    target: Database | Connection,
    settings: Settings,
    *,
    user_id: int,
    conversation_id: int | None,
    model: str,
    draft: str,
) -> Estimate | None:
    """What the line under the message box tells: the estimate, with why the draft cannot be
    sent as its problem (a typed error included); None when no model is chosen."""
    if not model:
        return None
    try:
        return estimate(
            target,
            settings,
            user_id=user_id,
            conversation_id=conversation_id,
            model=model,
            draft=draft,
        )
    except AICreditsError as exc:
        return Estimate(prompt_tokens=0, approx_credits=0, max_credits=0, problem=str(exc))


def choose_model(current: str, offered: Sequence[str]) -> str:
    """Keep the chosen model while it is still offered, else the first one offered."""
    if current in offered:
        return current
    return offered[0] if offered else ""


def choose_conversation(wanted: str, listed: Sequence[str]) -> str:
    """The conversation to open on load: the one asked for if it is the user's, else the
    most recent, else "" (a new conversation)."""
    return wanted if wanted in listed else (listed[0] if listed else "")


@dataclass(frozen=True, slots=True)
class OfferedModel:
    id: str
    label: str
    price: Price


@dataclass(frozen=True, slots=True)
class ChatPage:
    """Everything the chat page shows on load, as of one moment."""

    available: int  # the header's credits
    usage: thresholds.UsageStatus
    trial_notice: str  # "" when there is nothing to say
    models: list[OfferedModel]  # the configured models that have a price
    model: str  # the one selected ("" when none is offered)
    conversations: list[ConversationView]
    opened: ConversationView | None  # None: a new conversation
    messages: list[MessageView]


def chat_page(
    db: Database, settings: Settings, *, user_id: int, model: str, wanted: str
) -> ChatPage:
    """The chat page, read in one snapshot. `model` is the one selected so far, `wanted` the
    conversation id the address asks for (kept while it is the user's). The opened
    conversation's own model is selected, when it is still offered."""
    with db.read(snapshot=True) as conn:
        offered = []
        for spec in settings.models:
            try:
                price = pricing.current_price(conn, model=spec.id)
            except AICreditsError:
                continue  # not priced yet: not offered
            offered.append(OfferedModel(id=spec.id, label=spec.label, price=price))
        offered_ids = [m.id for m in offered]
        model = choose_model(model, offered_ids)
        listed = conversations.list_conversations(conn, user_id=user_id)
        target = choose_conversation(wanted, [str(c.id) for c in listed])
        opened = next((c for c in listed if str(c.id) == target), None)
        messages: list[MessageView] = []
        if opened is not None:
            messages = conversations.get_messages(conn, user_id=user_id, conversation_id=opened.id)
            if opened.model in offered_ids:
                model = opened.model
        return ChatPage(
            available=ledger.get_balance(conn, user_id=user_id).available,
            usage=thresholds.status(conn, settings, user_id=user_id),
            trial_notice=trials.trial_notice(conn, user_id=user_id) or "",
            models=offered,
            model=model,
            conversations=listed,
            opened=opened,
            messages=messages,
        )


@dataclass(frozen=True, slots=True)
class ChatReply:
    """A reply under way: the reserved turn, and where it is stored."""

    turn: Turn
    exchange: Exchange


async def start_reply(
    gateway: Gateway,
    db: Database,
    *,
    user_id: int,
    ip: str | None,
    conversation_id: int | None,
    model: str,
    text: str,
) -> ChatReply:
    """Reserve, store the question, and get ready to stream a reply to `text`. Raises the
    gateway's typed errors (nothing is stored and nothing charged when it does)."""
    text = text.strip()
    if not text:
        raise InvalidRequest("Type a message first.")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"A message can be at most {MAX_PROMPT_CHARS:,} characters.")
    messages = await run_blocking(
        prompt_messages, db, user_id=user_id, conversation_id=conversation_id, text=text
    )
    request = ChatRequest(model=model, messages=messages)
    turn = await gateway.start(user_id=user_id, request=request, ip=ip)
    try:
        exchange = await run_blocking(
            conversations.begin_exchange,
            db,
            user_id=user_id,
            conversation_id=conversation_id,
            model=model,
            prompt=text,
            request_id=turn.request_id,
        )
    except BaseException:
        await turn.abandon()
        raise
    turn.on_progress = functools.partial(_save_progress, exchange.reply_id)
    turn.on_finished = functools.partial(_record_end, db, exchange)
    return ChatReply(turn=turn, exchange=exchange)


def nothing_delivered(result: TurnResult) -> bool:
    """The model never answered (or the server stopped it first): nothing to keep."""
    return result.outcome == "failed" or (
        result.outcome == "interrupted" and not result.text and not result.charged
    )


def _save_progress(reply_id: int, conn: Connection, text: str) -> None:
    conversations.save_partial_reply(conn, reply_id=reply_id, text=text)


def _record_end(db: Database, exchange: Exchange, result: TurnResult) -> None:
    """The reply as delivered, with its cost; a question that got no reply is withdrawn (the
    chat puts it back in the message box, with why)."""
    if nothing_delivered(result):
        conversations.withdraw_exchange(db, exchange=exchange)
        return
    conversations.finish_reply(
        db,
        reply_id=exchange.reply_id,
        text=result.text,
        usage=Reply(
            request_id=result.request_id,
            outcome=result.outcome,
            input_tokens=result.input_tokens,
            output_tokens=result.output_tokens,
            credits_charged=result.charged,
            estimated=result.estimated,
        ),
    )
