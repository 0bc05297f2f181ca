"""Conversations and their messages: stored in the database, never only in memory, and
always scoped to their owner (a conversation id from the browser proves nothing)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database
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


def list_conversations(db: Database, *, user_id: int, limit: int = 200) -> list[ConversationView]:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(conversations)
            .where(conversations.c.user_id == user_id)
            .order_by(conversations.c.updated_at.desc(), conversations.c.id.desc())
            .limit(limit)
        ).all()
    return [_conversation(r) for r in rows]


def get_conversation(db: Database, *, user_id: int, conversation_id: int) -> ConversationView:
    with db.read() as conn:
        row = conn.execute(
            sa.select(conversations).where(
                conversations.c.id == conversation_id, conversations.c.user_id == user_id
            )
        ).first()
    if row is None:
        raise UnknownConversation("That conversation does not exist.")
    return _conversation(row)


def get_messages(db: Database, *, user_id: int, conversation_id: int) -> list[MessageView]:
    with db.read() as conn:
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


def record_exchange(
    db: Database,
    *,
    user_id: int,
    conversation_id: int | None,
    model: str,
    prompt: str,
    reply: str,
    usage: Reply,
    now: datetime | None = None,
) -> int:
    """Store one question and its reply together (a new conversation when the id is None).
    Returns the conversation id."""
    now = now or utcnow()
    with db.transaction() as conn:
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
        conn.execute(
            sa.insert(chat_messages),
            [
                {
                    "conversation_id": conversation_id,
                    "role": "user",
                    "content": prompt,
                    "model": model,
                    "request_id": None,
                    "outcome": "",
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "credits_charged": 0,
                    "estimated": False,
                    "created_at": now,
                },
                {
                    "conversation_id": conversation_id,
                    "role": "assistant",
                    "content": reply,
                    "model": model,
                    "request_id": usage.request_id,
                    "outcome": usage.outcome,
                    "input_tokens": usage.input_tokens,
                    "output_tokens": usage.output_tokens,
                    "credits_charged": usage.credits_charged,
                    "estimated": usage.estimated,
                    "created_at": now,
                },
            ],
        )
    return conversation_id
