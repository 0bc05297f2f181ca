"""What the chat page's handlers call: conversations kept per user, the estimate, and one
metered reply stored with what it cost (on SQLite and Postgres, with the fake upstream)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import Pool

from aicredits.adapters.db import Database
from aicredits.devtools.fake_upstream import FakeUpstreamConfig
from aicredits.devtools.fake_upstream import build_app as build_fake_upstream
from aicredits.domain.errors import InsufficientCredits, InvalidRequest
from aicredits.services import chat, conversations, ledger, pricing
from aicredits.services.conversations import UnknownConversation
from aicredits.services.gateway import build_gateway
from aicredits.settings import ModelSpec, Settings
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


def test_the_chat_page_is_read_in_one_snapshot(db: Database, settings: Settings) -> None:
    user = make_user(db, credits=1_000)
    older = reply(db, settings, user, None, "First chat")
    newer = reply(db, settings, user, None, "Second chat")
    unpriced = ModelSpec(id="unpriced", label="", input_per_mtok=1, output_per_mtok=1)
    with_unpriced = settings.model_copy(update={"models": [*settings.models, unpriced]})
    checkouts = []

    def count(*_: object) -> None:
        checkouts.append(1)

    sa.event.listen(Pool, "checkout", count)  # every pool, the autocommit one included
    try:
        page = chat.chat_page(db, with_unpriced, user_id=user, model="", wanted=str(older))
    finally:
        sa.event.remove(Pool, "checkout", count)
    assert len(checkouts) == 1
    assert [m.id for m in page.models] == [MODEL.id]  # a model with no price is not offered
    assert page.model == MODEL.id
    assert [c.id for c in page.conversations] == [newer, older]
    assert page.opened is not None and page.opened.id == older
    assert [m.role for m in page.messages] == ["user", "assistant"]
    assert page.messages[0].content == "First chat"
    assert page.available == ledger.get_balance(db, user_id=user).available
    assert page.usage.banner is None and page.trial_notice == ""


def test_the_chat_page_opens_the_latest_conversation_unless_the_users_own_is_asked_for(
    db: Database, settings: Settings
) -> None:
    user = make_user(db, credits=1_000)
    first = reply(db, settings, user, None, "Mine")
    stranger = make_user(db, credits=1_000)
    theirs = reply(db, settings, stranger, None, "Theirs")
    for wanted in (str(theirs), "", "not-a-number"):
        page = chat.chat_page(db, settings, user_id=user, model="gone", wanted=wanted)
        assert page.opened is not None and page.opened.id == first, wanted
        assert page.model == MODEL.id  # the chosen one is no longer offered: the first is
    empty = chat.chat_page(db, settings, user_id=make_user(db), model="", wanted="")
    assert (empty.opened, empty.messages, empty.conversations) == (None, [], [])
    unconfigured = settings.model_copy(update={"models": []})
    nothing = chat.chat_page(db, unconfigured, user_id=user, model="", wanted="")
    assert nothing.model == ""
