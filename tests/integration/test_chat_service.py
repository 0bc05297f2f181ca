"""What the chat page's handlers call: conversations kept per user, the estimate, and one
metered reply stored with what it cost (on SQLite and Postgres, with the fake upstream)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from aicredits.adapters.db import Database
from aicredits.devtools.fake_upstream import FakeUpstreamConfig
from aicredits.devtools.fake_upstream import build_app as build_fake_upstream
from aicredits.domain.errors import InsufficientCredits, InvalidRequest
from aicredits.services import chat, conversations, ledger, pricing
from aicredits.services.conversations import UnknownConversation
from aicredits.services.gateway import build_gateway
from aicredits.settings import Settings
from tests.factories import make_user
from tests.integration.gateway_fixtures import MODEL
from tests.servers import serve_asgi


@pytest.fixture
def settings(db: Database) -> Iterator[Settings]:
    app = build_fake_upstream(FakeUpstreamConfig(models=[MODEL.id], reply_tokens=10))
    with serve_asgi(app, ready_path="/_fake/stats") as upstream:
        s = Settings(
            _env_file=None,
            database_url=db.url,
            openai_base_url=f"{upstream}/v1",
            models=[MODEL],
            rate_limit_user_per_minute=0,
            rate_limit_ip_per_minute=0,
            rate_limit_concurrent=0,
        )
        pricing.seed_prices(db, s.models)
        yield s


def reply(db: Database, settings: Settings, user: int, conversation: int | None, text: str) -> int:
    async def run() -> int:
        gateway = build_gateway(settings, db)
        try:
            started = await chat.start_reply(
                gateway, db, user_id=user, ip=None, conversation_id=conversation,
                model=MODEL.id, text=text,
            )  # fmt: skip
            await started.turn.run()
        finally:
            await gateway.aclose()
        return started.exchange.conversation_id

    return asyncio.run(run())


def test_a_reply_starts_a_conversation_titled_by_the_first_message(
    db: Database, settings: Settings
) -> None:
    user = make_user(db, credits=1_000)
    conversation = reply(db, settings, user, None, "What is the capital of France?")
    (listed,) = conversations.list_conversations(db, user_id=user)
    assert (listed.id, listed.title) == (conversation, "What is the capital of France?")
    question, answer = conversations.get_messages(db, user_id=user, conversation_id=conversation)
    assert (question.role, answer.role) == ("user", "assistant")
    assert answer.output_tokens == 10 and answer.outcome == "completed"
    spent = 1_000 - ledger.get_balance(db, user_id=user).balance
    assert answer.credits_charged == spent > 0


def test_the_next_message_sends_the_whole_conversation(db: Database, settings: Settings) -> None:
    user = make_user(db, credits=1_000)
    conversation = reply(db, settings, user, None, "First question")
    prompt = chat.prompt_messages(db, user_id=user, conversation_id=conversation, text="Second")
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    reply(db, settings, user, conversation, "Second")
    assert len(conversations.get_messages(db, user_id=user, conversation_id=conversation)) == 4


def test_another_users_conversation_is_out_of_reach(db: Database, settings: Settings) -> None:
    owner, intruder = make_user(db, credits=1_000), make_user(db, credits=1_000)
    conversation = reply(db, settings, owner, None, "private")
    with pytest.raises(UnknownConversation):
        conversations.get_messages(db, user_id=intruder, conversation_id=conversation)
    with pytest.raises(UnknownConversation):
        conversations.rename_conversation(
            db, user_id=intruder, conversation_id=conversation, title="mine now"
        )
    with pytest.raises(UnknownConversation):
        conversations.delete_conversation(db, user_id=intruder, conversation_id=conversation)
    with pytest.raises(UnknownConversation):
        reply(db, settings, intruder, conversation, "let me in")
    assert conversations.list_conversations(db, user_id=intruder) == []
    assert len(conversations.get_messages(db, user_id=owner, conversation_id=conversation)) == 2


def test_rename_and_delete(db: Database, settings: Settings) -> None:
    user = make_user(db, credits=1_000)
    conversation = reply(db, settings, user, None, "hello")
    conversations.rename_conversation(db, user_id=user, conversation_id=conversation, title="Hi")
    assert conversations.list_conversations(db, user_id=user)[0].title == "Hi"
    conversations.delete_conversation(db, user_id=user, conversation_id=conversation)
    assert conversations.list_conversations(db, user_id=user) == []
    assert ledger.get_balance(db, user_id=user).balance < 1_000  # the cost stays in the ledger


def test_the_estimate_uses_the_reservation_s_pricing(db: Database, settings: Settings) -> None:
    user = make_user(db, credits=1_000)
    estimate = chat.estimate(
        db, settings, user_id=user, conversation_id=None, model=MODEL.id, draft="hi"
    )
    price = pricing.current_price(db, model=MODEL.id)
    messages = [{"role": "user", "content": "hi"}]
    quote = pricing.quote_worst_case(price, MODEL, messages=messages, max_tokens=None)
    assert estimate.max_credits == quote.credits
    assert 0 < estimate.approx_credits <= estimate.max_credits
    too_long = chat.estimate(
        db, settings, user_id=user, conversation_id=None, model=MODEL.id, draft="word " * 5000
    )
    assert "prompt is" in too_long.problem


def test_refusals_store_nothing(db: Database, settings: Settings) -> None:
    user = make_user(db, credits=0)
    with pytest.raises(InsufficientCredits):
        reply(db, settings, user, None, "too expensive")
    with pytest.raises(InvalidRequest):
        reply(db, settings, user, None, "   ")
    assert conversations.list_conversations(db, user_id=user) == []
    assert ledger.get_balance(db, user_id=user) == ledger.Balance(user, 0, 0)
