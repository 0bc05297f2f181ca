"""Replies in flight, inside one worker: checkpoints and leases while a reply streams, the
drain on shutdown (finish within the grace, then cut and settle for what was delivered), and
the chat's record of a reply, kept from before the model is called to after it settles.
On SQLite and Postgres, against the fake upstream. The same, with real processes killed and
stopped, is in tests/system/test_worker_stop.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.tables import chat_messages, holds, usage_events, utcnow
from aicredits.adapters.tokenizer import count_text_tokens
from aicredits.adapters.upstream import Delta
from aicredits.devtools.fake_upstream import FakeUpstreamConfig
from aicredits.devtools.fake_upstream import build_app as build_fake_upstream
from aicredits.domain.chat import ChatRequest, parse_chat_request
from aicredits.domain.embeddings import parse_embedding_request
from aicredits.domain.pricing import usage_cost
from aicredits.domain.reply import ReplyBuilder
from aicredits.services import chat, conversations, ledger, pricing, recovery
from aicredits.services.embeddings import start_embeddings
from aicredits.services.gateway import (
    Gateway,
    ReplyInterrupted,
    ServerRestarting,
    Turn,
    build_gateway,
    close_all,
    drain_all,
    shared_gateway,
)
from aicredits.services.verify import verify_ledger
from aicredits.settings import DEFAULT_EMBEDDING_MODELS, Settings
from tests.factories import make_user
from tests.integration.gateway_fixtures import MODEL
from tests.servers import serve_asgi

REPLY_TOKENS = 40
EMBEDDER = DEFAULT_EMBEDDING_MODELS[0].id


@pytest.fixture
def settings(db: Database) -> Iterator[Settings]:
    models = [MODEL.id, EMBEDDER]
    app = build_fake_upstream(FakeUpstreamConfig(models=models, reply_tokens=REPLY_TOKENS))
    with serve_asgi(app, ready_path="/_fake/stats") as upstream:
        s = Settings(
            _env_file=None,
            database_url=db.url,
            openai_base_url=f"{upstream}/v1",
            models=[MODEL],
            rate_limit_user_per_minute=0,
            rate_limit_ip_per_minute=0,
            rate_limit_concurrent=0,
            hold_lease_seconds=2.0,
            stream_checkpoint_seconds=0.2,
        )
        pricing.seed_prices(db, s.priced_models)
        yield s
    with db.read() as conn:
        unbilled = conn.execute(sa.select(usage_events).where(usage_events.c.unbilled > 0)).all()
    assert unbilled == [], "a call's usage went beyond its hold"


@contextlib.asynccontextmanager
async def gateway_for(settings: Settings, db: Database) -> AsyncIterator[Gateway]:
    gateway = build_gateway(settings, db)
    try:
        yield gateway
    finally:
        await gateway.aclose()


def ask(text: str) -> ChatRequest:
    return ChatRequest(model=MODEL.id, messages=[{"role": "user", "content": text}])


def hold_row(db: Database, request_id: str) -> Any:
    with db.read() as conn:
        return conn.execute(sa.select(holds).where(holds.c.request_id == request_id)).one()


def cost_of(db: Database, hold: Any, output_tokens: int) -> int:
    price = pricing.price_version(db, version_id=hold.price_version_id)
    return usage_cost(price, input_tokens=hold.input_tokens, output_tokens=output_tokens)


def test_a_streaming_reply_checkpoints_what_it_delivered_and_renews_its_lease(
    db: Database, settings: Settings
) -> None:
    user = make_user(db, credits=10_000)

    async def run() -> tuple[list[Any], int]:
        async with gateway_for(settings, db) as gateway:
            turn = await gateway.start(
                user_id=user, request=ask("go [fake tokens-per-second=20]"), ip=None
            )
            reserved_until = turn.hold.expires_at
            seen: list[Any] = []
            got = 0
            async with contextlib.aclosing(turn.stream()) as pieces:
                async for _ in pieces:
                    got += 1
                    if got in (10, 20, 30):
                        await asyncio.sleep(0.5)  # a checkpoint passes
                        seen.append(hold_row(db, turn.request_id))
            assert all(row.expires_at > reserved_until for row in seen)
            return seen, got

    seen, got = asyncio.run(run())
    assert got == REPLY_TOKENS
    delivered = [row.delivered_tokens for row in seen]
    # Recorded as it went, never ahead of what had been handed out.
    assert delivered == sorted(delivered) and 0 < delivered[0] <= 10 and delivered[-1] <= 30
    assert delivered[-1] >= 20
    assert hold_row(db, seen[0].request_id).status == "settled"
    assert verify_ledger(db) == []


def ask_api(text: str, **fields: Any) -> ChatRequest:
    """A request as the API parses it, with any field of the chat surface."""
    body = {"model": MODEL.id, "messages": [{"role": "user", "content": text}], **fields}
    return parse_chat_request(body, models=[MODEL.id])


def delivered_tokens(pieces: list[Delta]) -> int:
    """The tokens of every choice's text and tool calls among `pieces`."""
    reply = ReplyBuilder()
    for piece in pieces:
        reply.add(index=piece.index, text=piece.text, tool_calls=piece.tool_calls)
    return sum(count_text_tokens(text) for text in reply.billable_texts())


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.mark.parametrize(
    "fields",
    [{"n": 3}, {"tools": [WEATHER]}],
    ids=["three choices", "a tool call"],
)
def test_a_checkpoint_records_every_choice_and_tool_call_delivered(
    db: Database, settings: Settings, fields: dict[str, Any]
) -> None:
    """What the sweeper would charge if this worker died now: all that was handed out."""
    user = make_user(db, credits=10_000)

    async def run() -> tuple[int, int]:
        async with gateway_for(settings, db) as gateway:
            turn = await gateway.start(
                user_id=user, request=ask_api("go [fake tokens-per-second=20]", **fields), ip=None
            )
            pieces: list[Delta] = []
            async with contextlib.aclosing(turn.deltas()) as stream:
                async for piece in stream:
                    pieces.append(piece)
                    if len(pieces) == 6:
                        await asyncio.sleep(0.5)  # a checkpoint passes
                        recorded = hold_row(db, turn.request_id).delivered_tokens
                        return recorded, delivered_tokens(pieces)
            raise AssertionError("the reply ended before six pieces")

    recorded, delivered = asyncio.run(run())
    assert recorded == delivered > 0
    assert verify_ledger(db) == []


def test_a_drain_charges_every_choice_for_what_it_delivered(
    db: Database, settings: Settings
) -> None:
    user = make_user(db, credits=10_000)

    async def run() -> tuple[int, Any]:
        async with gateway_for(settings, db) as gateway:
            turn = await gateway.start(
                user_id=user, request=ask_api("long [fake tokens-per-second=10]", n=3), ip=None
            )
            pieces: list[Delta] = []

            async def show() -> None:
                async for piece in turn.deltas():
                    pieces.append(piece)

            caller = asyncio.ensure_future(show())
            while len(pieces) < 7:
                await asyncio.sleep(0.01)
            assert await gateway.inflight.drain(grace=0.2) == 1
            with pytest.raises(ReplyInterrupted) as cut:
                await caller
            assert {piece.index for piece in pieces} == {0, 1, 2}
            return delivered_tokens(pieces), cut.value.result

    delivered, result = asyncio.run(run())
    assert (result.outcome, result.output_tokens, result.estimated) == (
        "interrupted",
        delivered,
        True,
    )
    hold = hold_row(db, result.request_id)
    assert hold.charged == result.charged == cost_of(db, hold, delivered)
    assert verify_ledger(db) == []


def test_an_embeddings_call_has_its_lease_renewed_and_a_drain_cut_costs_nothing(
    db: Database, settings: Settings
) -> None:
    user = make_user(db, credits=10_000)
    fake = settings.upstream_base_url.removesuffix("/v1")
    httpx.post(f"{fake}/_fake/next", json={"latency_ms": 5_000}).raise_for_status()
    request = parse_embedding_request({"model": EMBEDDER, "input": "x"}, models=[EMBEDDER])

    async def run() -> str:
        async with gateway_for(settings, db) as gateway:
            call = await start_embeddings(gateway, user_id=user, request=request, ip=None)
            running = asyncio.ensure_future(call.run())
            await asyncio.sleep(0.6)  # checkpoints pass while the upstream is silent
            assert hold_row(db, call.request_id).expires_at > call.hold.expires_at
            drain = gateway.inflight.drain(grace=0.2)
            with pytest.raises(ServerRestarting):
                await running
            assert await drain == 1
            return call.request_id

    request_id = asyncio.run(run())
    hold = hold_row(db, request_id)
    assert (hold.status, hold.charged) == ("released", None)
    assert ledger.get_balance(db, user_id=user) == ledger.Balance(user, 10_000, 0)


async def consume(turn: Turn, pieces: list[str], *, then: float = 0.0) -> None:
    """A caller showing a reply: it reads it to the end, then (like the chat page pushing
    its last update) takes `then` seconds more."""
    try:
        async for piece in turn.stream():
            pieces.append(piece)
    finally:
        await asyncio.sleep(then)


def test_a_drain_lets_a_short_reply_finish_and_refuses_new_calls(
    db: Database, settings: Settings
) -> None:
    user = make_user(db, credits=10_000)

    async def run() -> str:
        async with gateway_for(settings, db) as gateway:
            turn = await gateway.start(
                user_id=user, request=ask("quick [fake tokens-per-second=50]"), ip=None
            )
            pieces: list[str] = []
            caller = asyncio.ensure_future(consume(turn, pieces, then=0.5))
            while not pieces:
                await asyncio.sleep(0.01)
            drain = gateway.inflight.drain(grace=5)
            with pytest.raises(ServerRestarting):
                await gateway.start(user_id=user, request=ask("another"), ip=None)
            assert await drain == 0  # nothing had to be cut
            assert caller.done()  # the drain waited for its caller to finish too
            assert len(pieces) == REPLY_TOKENS
            assert turn.result is not None
            return turn.result.outcome

    assert asyncio.run(run()) == "completed"
    assert verify_ledger(db) == []


def test_the_apps_shutdown_drains_then_closes_the_gateways_connections(
    db: Database, settings: Settings
) -> None:
    """What the app's lifespan does at its end: drain, then close. The connections to the
    upstream and the database end cleanly, and a gateway asked for afterwards takes no call."""
    user = make_user(db, credits=10_000)

    async def run() -> None:
        gateway = shared_gateway(settings, db)
        turn = await gateway.start(user_id=user, request=ask("hello"), ip=None)
        assert (await turn.run()).outcome == "completed"
        session = gateway.upstream._session
        assert session is not None and not session.closed
        assert await drain_all(grace=5) == 0
        await close_all()
        assert session.closed
        assert asyncio.get_running_loop() not in db._async_pools
        after = shared_gateway(settings, db)
        assert after is not gateway
        with pytest.raises(ServerRestarting):
            await after.start(user_id=user, request=ask("another"), ip=None)
        await close_all()

    asyncio.run(run())
    assert verify_ledger(db) == []
    assert ledger.get_balance(db, user_id=user).balance < 10_000


def test_a_drain_cuts_a_long_reply_after_the_grace_and_charges_what_was_delivered(
    db: Database, settings: Settings
) -> None:
    user = make_user(db, credits=10_000)

    async def run() -> tuple[int, Any]:
        async with gateway_for(settings, db) as gateway:
            turn = await gateway.start(
                user_id=user, request=ask("long [fake tokens-per-second=10]"), ip=None
            )
            pieces: list[str] = []
            caller = asyncio.ensure_future(consume(turn, pieces, then=0.3))
            while len(pieces) < 3:
                await asyncio.sleep(0.01)
            assert await gateway.inflight.drain(grace=0.5) == 1
            assert caller.done()
            with pytest.raises(ReplyInterrupted) as cut:
                caller.result()
            return len(pieces), cut.value.result

    got, result = asyncio.run(run())
    assert 3 <= got < REPLY_TOKENS
    hold = hold_row(db, result.request_id)
    assert (result.outcome, result.output_tokens, result.estimated) == ("interrupted", got, True)
    assert hold.status == "settled" and hold.charged == result.charged == cost_of(db, hold, got)
    assert ledger.get_balance(db, user_id=user) == ledger.Balance(user, 10_000 - result.charged, 0)
    with db.read() as conn:
        event = conn.execute(
            sa.select(usage_events).where(usage_events.c.request_id == result.request_id)
        ).one()
    assert (event.outcome, event.output_tokens) == ("interrupted", got)
    assert verify_ledger(db) == []


def test_a_reply_cut_by_a_drain_before_its_first_token_costs_nothing(
    db: Database, settings: Settings
) -> None:
    user = make_user(db, credits=10_000)

    async def run() -> str:
        async with gateway_for(settings, db) as gateway:
            turn = await gateway.start(
                user_id=user, request=ask("slow [fake latency-ms=5000]"), ip=None
            )
            running = asyncio.ensure_future(turn.run())
            await asyncio.sleep(0.2)  # waiting for the upstream's first byte
            drain = gateway.inflight.drain(grace=0.3)
            with pytest.raises(ServerRestarting):
                await running
            assert await drain == 1
            return turn.request_id

    request_id = asyncio.run(run())
    hold = hold_row(db, request_id)
    assert (hold.status, hold.charged) == ("released", None)
    assert ledger.get_balance(db, user_id=user) == ledger.Balance(user, 10_000, 0)


# --- the chat's record of a reply ------------------------------------------------------------


def messages_of(db: Database, conversation_id: int) -> list[Any]:
    with db.read() as conn:
        return list(
            conn.execute(
                sa.select(chat_messages)
                .where(chat_messages.c.conversation_id == conversation_id)
                .order_by(chat_messages.c.id)
            )
        )


def test_the_question_is_stored_before_the_model_is_called_and_the_reply_as_it_streams(
    db: Database, settings: Settings
) -> None:
    user = make_user(db, credits=10_000)

    async def run() -> None:
        async with gateway_for(settings, db) as gateway:
            started = await chat.start_reply(
                gateway, db, user_id=user, ip=None, conversation_id=None, model=MODEL.id,
                text="tell me [fake tokens-per-second=20]",
            )  # fmt: skip
            conversation = started.exchange.conversation_id
            question, answer = messages_of(db, conversation)
            assert (question.role, question.content) == (
                "user",
                "tell me [fake tokens-per-second=20]",
            )
            assert (answer.role, answer.content, answer.outcome) == ("assistant", "", "streaming")
            got: list[str] = []
            async for piece in started.turn.stream():
                got.append(piece)
                if len(got) == 15:
                    await asyncio.sleep(0.5)  # a checkpoint passes
                    partial = messages_of(db, conversation)[1]
                    assert partial.outcome == "streaming"
                    assert partial.content and "".join(got).startswith(partial.content)
            final = messages_of(db, conversation)[1]
            assert (final.content, final.outcome) == ("".join(got), "completed")
            assert final.credits_charged == 10_000 - ledger.get_balance(db, user_id=user).balance

    asyncio.run(run())


def test_a_question_whose_model_failed_is_withdrawn_with_its_new_conversation(
    db: Database, settings: Settings
) -> None:
    user = make_user(db, credits=10_000)

    async def run() -> None:
        async with gateway_for(settings, db) as gateway:
            started = await chat.start_reply(
                gateway, db, user_id=user, ip=None, conversation_id=None, model=MODEL.id,
                text="fail [fake fault=500]",
            )  # fmt: skip
            with pytest.raises(Exception, match="failed"):
                await started.turn.run()

    asyncio.run(run())
    assert conversations.list_conversations(db, user_id=user) == []
    assert ledger.get_balance(db, user_id=user) == ledger.Balance(user, 10_000, 0)


def test_a_reply_left_streaming_by_a_dead_worker_is_finished_by_the_sweeper(
    db: Database, settings: Settings
) -> None:
    """What a SIGKILL leaves: a hold with a checkpoint, a reply saved up to that checkpoint.
    The sweeper charges the checkpoint and finishes the reply with that cost."""
    user = make_user(db, credits=10_000)
    now = utcnow()
    price = pricing.current_price(db, model=MODEL.id)
    hold = ledger.reserve(
        db, user_id=user, credits=500, request_id="req_dead", lease=timedelta(seconds=2),
        pricing=ledger.HoldPricing(
            model=MODEL.id, price_version_id=price.version_id, input_tokens=12
        ),
        now=now,
    )  # fmt: skip
    exchange = conversations.begin_exchange(
        db, user_id=user, conversation_id=None, model=MODEL.id, prompt="hello",
        request_id="req_dead", now=now,
    )  # fmt: skip
    with db.transaction() as conn:
        ledger.record_progress(
            conn, hold_id=hold.id, delivered_tokens=7, until=now + timedelta(seconds=2), now=now
        )
        conversations.save_partial_reply(conn, reply_id=exchange.reply_id, text="seven words")
    assert recovery.recover(db, lease=timedelta(seconds=2), now=now).holds == 0  # still alive
    report = recovery.recover(db, lease=timedelta(seconds=2), now=now + timedelta(seconds=3))
    expected = usage_cost(price, input_tokens=12, output_tokens=7)
    assert (report.holds_settled, report.credits_charged, report.replies_finished) == (
        1,
        expected,
        1,
    )
    reply = messages_of(db, exchange.conversation_id)[1]
    assert (reply.content, reply.outcome, reply.credits_charged) == (
        "seven words",
        "lost",
        expected,
    )
    assert (reply.output_tokens, reply.estimated) == (7, True)
    assert verify_ledger(db) == []


def test_a_reply_whose_worker_died_before_any_output_keeps_its_question_and_costs_nothing(
    db: Database, settings: Settings
) -> None:
    user = make_user(db, credits=10_000)
    now = utcnow()
    ledger.reserve(
        db, user_id=user, credits=500, request_id="req_silent", lease=timedelta(seconds=2),
        now=now,
    )  # fmt: skip
    exchange = conversations.begin_exchange(
        db, user_id=user, conversation_id=None, model=MODEL.id, prompt="anyone there?",
        request_id="req_silent", now=now,
    )  # fmt: skip
    report = recovery.recover(db, lease=timedelta(seconds=2), now=now + timedelta(seconds=3))
    assert (report.holds_released, report.replies_finished) == (1, 1)
    question, reply = messages_of(db, exchange.conversation_id)
    assert question.content == "anyone there?"
    assert (reply.content, reply.outcome, reply.credits_charged) == ("", "lost", 0)
    assert ledger.get_balance(db, user_id=user) == ledger.Balance(user, 10_000, 0)
