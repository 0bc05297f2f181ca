"""Conversations and their messages: stored in the database, never only in memory, and
always scoped to their owner (a conversation id from the browser proves nothing)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database, reading
from aicredits.adapters.tables import chat_messages, conversations, utcnow
from aicredits.domain.errors import AICreditsError, InvalidRequest

MAX_TITLE = 120
TITLE_WORDS = 8
MAX_MESSAGE_CHARS = 100_000


class UnknownConversation(AICreditsError):
    code = "unknown_conversation"


@dataclass(frozen=True, slots=True)
class ConversationView:
    id: int
    title: str
    model: str
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class MessageView:
    id: int
    role: str
    content: str
    model: str
    outcome: str
    input_tokens: int
    output_tokens: int
    credits_charged: int
    estimated: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Reply:
    """What an assistant reply used and cost, stored beside its text."""

    request_id: str
    outcome: str
    input_tokens: int
    output_tokens: int
    credits_charged: int
    estimated: bool


def title_from(text: str) -> str:
    """A title from the first message: its first words, on one line."""
    words = " ".join(text.split()).split(" ")
    title = " ".join(words[:TITLE_WORDS])
    if len(words) > TITLE_WORDS:
        title += "…"
    return title[:MAX_TITLE] or "New chat"


def clean_title(title: str | None) -> str:
    text = " ".join((title or "").split())
    if not text:
        raise InvalidRequest("A title cannot be empty.")
    if len(text) > MAX_TITLE:
        raise InvalidRequest(f"A title can be at most {MAX_TITLE} characters.")
    return text


def _owned(conn: Connection, user_id: int, conversation_id: int) -> sa.Row[tuple[int]]:
    row = conn.execute(
        sa.select(conversations.c.id).where(
            conversations.c.id == conversation_id, conversations.c.user_id == user_id
        )
    ).first()
    if row is None:
        raise UnknownConversation("That conversation does not exist.")
    return row


def _conversation(row: sa.Row[tuple[object, ...]]) -> ConversationView:
    return ConversationView(
        id=row.id, title=row.title or "New chat", model=row.model, updated_at=row.updated_at
    )


def list_conversations(
    target: Database | Connection, *, user_id: int, limit: int = 200
) -> list[ConversationView]:
    with reading(target) as conn:
        rows = conn.execute(
            sa.select(conversations)
            .where(conversations.c.user_id == user_id)
            .order_by(conversations.c.updated_at.desc(), conversations.c.id.desc())
            .limit(limit)
        ).all()
    return [_conversation(r) for r in rows]


def get_conversation(
    target: Database | Connection, *, user_id: int, conversation_id: int
) -> ConversationView:
    with reading(target) as conn:
        row = conn.execute(
            sa.select(conversations).where(
                conversations.c.id == conversation_id, conversations.c.user_id == user_id
            )
        ).first()
    if row is None:
        raise UnknownConversation("That conversation does not exist.")
    return _conversation(row)


def get_messages(
    target: Database | Connection, *, user_id: int, conversation_id: int
) -> list[MessageView]:
    with reading(target) as conn:
        _owned(conn, user_id, conversation_id)
        rows = conn.execute(
            sa.select(chat_messages)
            .where(chat_messages.c.conversation_id == conversation_id)
            .order_by(chat_messages.c.id)
        ).all()
    return [
        MessageView(
            id=r.id,
            role=r.role,
            content=r.content,
            model=r.model,
            outcome=r.outcome,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            credits_charged=r.credits_charged,
            estimated=r.estimated,
            created_at=r.created_at,
        )
        for r in rows
    ]


def rename_conversation(
    db: Database, *, user_id: int, conversation_id: int, title: str
) -> ConversationView:
    title = clean_title(title)
    with db.transaction() as conn:
        _owned(conn, user_id, conversation_id)
        conn.execute(
            sa.update(conversations)
            .where(conversations.c.id == conversation_id)
            .values(title=title)
        )
    return get_conversation(db, user_id=user_id, conversation_id=conversation_id)


def delete_conversation(db: Database, *, user_id: int, conversation_id: int) -> None:
    """Delete a conversation and its messages. What its replies cost stays in the ledger."""
    with db.transaction() as conn:
        _owned(conn, user_id, conversation_id)
        conn.execute(
            sa.delete(chat_messages).where(chat_messages.c.conversation_id == conversation_id)
        )
        conn.execute(sa.delete(conversations).where(conversations.c.id == conversation_id))


# --- a reply stored as it streams -------------------------------------------------------------

# An assistant message whose reply is still being written (or whose worker died mid-reply and
# whose hold the sweeper has not settled yet).
STREAMING = "streaming"


@dataclass(frozen=True, slots=True)
class Exchange:
    """A question stored before the model is called, and the row its reply streams into."""

    conversation_id: int
    question_id: int
    reply_id: int
    # The conversation was made for this question (and goes if the question is withdrawn).
    new_conversation: bool


def begin_exchange(
    db: Database,
    *,
    user_id: int,
    conversation_id: int | None,
    model: str,
    prompt: str,
    request_id: str,
    now: datetime | None = None,
) -> Exchange:
    """Store the question and an empty reply (outcome "streaming") before the model is
    called, so a reload or a crash never loses the question. A new conversation when
    `conversation_id` is None."""
    now = now or utcnow()
    with db.transaction() as conn:
        new = conversation_id is None
        if conversation_id is None:
            conversation_id = int(
                conn.execute(
                    sa.insert(conversations)
                    .values(
                        user_id=user_id,
                        title=title_from(prompt),
                        model=model,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(conversations.c.id)
                ).scalar_one()
            )
        else:
            _owned(conn, user_id, conversation_id)
            conn.execute(
                sa.update(conversations)
                .where(conversations.c.id == conversation_id)
                .values(updated_at=now, model=model)
            )
        ids: list[int] = []
        for role, content, rid, outcome in (
            ("user", prompt, None, ""),
            ("assistant", "", request_id, STREAMING),
        ):
            ids.append(
                int(
                    conn.execute(
                        sa.insert(chat_messages)
                        .values(
                            conversation_id=conversation_id,
                            role=role,
                            content=content,
                            model=model,
                            request_id=rid,
                            outcome=outcome,
                            input_tokens=0,
                            output_tokens=0,
                            credits_charged=0,
                            estimated=False,
                            created_at=now,
                        )
                        .returning(chat_messages.c.id)
                    ).scalar_one()
                )
            )
    return Exchange(
        conversation_id=conversation_id,
        question_id=ids[0],
        reply_id=ids[1],
        new_conversation=new,
    )


def save_partial_reply(conn: Connection, *, reply_id: int, text: str) -> None:
    """The reply so far, while it streams (a finished reply is never overwritten)."""
    conn.execute(
        sa.update(chat_messages)
        .where(chat_messages.c.id == reply_id, chat_messages.c.outcome == STREAMING)
        .values(content=text[:MAX_MESSAGE_CHARS])
    )


def finish_reply(db: Database, *, reply_id: int, text: str, usage: Reply) -> bool:
    """The reply as delivered, with what it used and cost. Once: returns False when it was
    already finished."""
    with db.transaction() as conn:
        return _finish(conn, reply_id=reply_id, text=text, usage=usage)


def _finish(conn: Connection, *, reply_id: int, text: str, usage: Reply) -> bool:
    moved = conn.execute(
        sa.update(chat_messages)
        .where(chat_messages.c.id == reply_id, chat_messages.c.outcome == STREAMING)
        .values(
            content=text[:MAX_MESSAGE_CHARS],
            outcome=usage.outcome,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            credits_charged=usage.credits_charged,
            estimated=usage.estimated,
        )
    )
    return bool(moved.rowcount)


def withdraw_exchange(db: Database, *, exchange: Exchange) -> None:
    """Remove a question whose reply never came (nothing delivered, nothing charged): the
    chat puts it back in the message box, with why. Its conversation goes too if the
    question made it."""
    with db.transaction() as conn:
        conn.execute(
            sa.delete(chat_messages).where(
                chat_messages.c.id.in_([exchange.question_id, exchange.reply_id])
            )
        )
        if exchange.new_conversation:
            left = conn.execute(
                sa.select(sa.func.count())
                .select_from(chat_messages)
                .where(chat_messages.c.conversation_id == exchange.conversation_id)
            ).scalar_one()
            if not left:
                conn.execute(
                    sa.delete(conversations).where(conversations.c.id == exchange.conversation_id)
                )
