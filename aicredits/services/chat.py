"""The chat page's use cases: what the next message would cost, and one metered reply in a
stored conversation. The gateway does the metering; this module builds the prompt from the
conversation and keeps the exchange in it: the question is stored before the model is
called, the reply as it streams (with the gateway's checkpoints) and finished with its cost
when the turn settles, whatever becomes of the page that asked."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from aicredits.adapters.blocking import run_blocking
from aicredits.adapters.db import Database
from aicredits.domain.chat import ChatRequest
from aicredits.domain.errors import InvalidRequest, UnknownModel
from aicredits.domain.pricing import usage_cost
from aicredits.services import conversations, pricing
from aicredits.services.conversations import Exchange, Reply
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


def _history(db: Database, user_id: int, conversation_id: int | None) -> list[dict[str, Any]]:
    if conversation_id is None:
        return []
    return [
        {"role": m.role, "content": m.content}
        for m in conversations.get_messages(db, user_id=user_id, conversation_id=conversation_id)
        if m.content
    ]


def prompt_messages(
    db: Database, *, user_id: int, conversation_id: int | None, text: str
) -> list[dict[str, Any]]:
    """The whole conversation so far plus the new message: what the model is sent."""
    return [*_history(db, user_id, conversation_id), {"role": "user", "content": text}]


def estimate(
    db: Database,
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
    price = pricing.current_price(db, model=model)
    messages = prompt_messages(db, user_id=user_id, conversation_id=conversation_id, text=draft)
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
