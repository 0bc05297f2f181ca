"""The versioned price table and the quotes taken from it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from aicredits.adapters.db import Database
from aicredits.adapters.tables import utcnow
from aicredits.domain.errors import InvalidRequest, UnknownModel
from aicredits.services import pricing
from aicredits.settings import EmbeddingModelSpec, ModelSpec

SPEC = ModelSpec(
    id="m1", input_per_mtok=2_000, output_per_mtok=8_000, max_output_tokens=100, context_tokens=300
)


def test_seeding_prices_each_model_once(db: Database) -> None:
    assert [p.model for p in pricing.seed_prices(db, [SPEC])] == ["m1"]
    assert pricing.seed_prices(db, [SPEC]) == []
    assert len(pricing.price_history(db, model="m1")) == 1


def test_a_new_version_applies_from_its_date_and_old_ones_stay(db: Database) -> None:
    pricing.seed_prices(db, [SPEC])
    old = pricing.current_price(db, model="m1")
    tomorrow = utcnow() + timedelta(days=1)
    new = pricing.add_price_version(
        db,
        model="m1",
        input_per_mtok=3_000,
        output_per_mtok=9_000,
        actor="admin",
        effective_from=tomorrow,
    )
    assert pricing.current_price(db, model="m1") == old
    assert pricing.current_price(db, model="m1", at=tomorrow + timedelta(seconds=1)) == new
    assert new.version_id != old.version_id
    assert [p.version_id for p in pricing.price_history(db, model="m1")] == [
        old.version_id,
        new.version_id,
    ]


def test_a_model_without_a_price_is_unknown(db: Database) -> None:
    with pytest.raises(UnknownModel):
        pricing.current_price(db, model="nope")


def test_worst_case_quote_counts_the_prompt_and_clamps_the_output(db: Database) -> None:
    pricing.seed_prices(db, [SPEC])
    price = pricing.current_price(db, model="m1")
    messages = [{"role": "user", "content": "hello world"}]
    quote = pricing.quote_worst_case(price, SPEC, messages=messages, max_tokens=5000)
    assert (quote.prompt_tokens, quote.max_output_tokens) == (9, 100)
    assert quote.credits == 1  # ceil((9 * 2000 + 100 * 8000) / 1M) = ceil(0.818)
    assert pricing.price_usage(price, input_tokens=9, output_tokens=40) == 1


def test_a_quote_refuses_empty_messages_and_prompts_beyond_the_context(db: Database) -> None:
    pricing.seed_prices(db, [SPEC])
    price = pricing.current_price(db, model="m1")
    with pytest.raises(InvalidRequest, match="empty"):
        pricing.quote_worst_case(price, SPEC, messages=[], max_tokens=None)
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(InvalidRequest, match="at most 200"):
        pricing.quote_worst_case(price, SPEC, messages=long, max_tokens=None)


def test_a_quote_reserves_the_cap_for_each_choice_and_each_image_at_its_bound(
    db: Database,
) -> None:
    vision = SPEC.model_copy(update={"vision": True, "max_image_tokens": 1_000})
    pricing.seed_prices(db, [vision])
    price = pricing.current_price(db, model="m1")
    image = {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello world"}, image]}]
    quote = pricing.quote_worst_case(
        price, vision, messages=messages, max_tokens=50, images=2, choices=3
    )
    assert (quote.prompt_tokens, quote.max_output_tokens, quote.choices) == (9 + 2_000, 50, 3)
    assert quote.credits == pricing.price_usage(price, input_tokens=2_009, output_tokens=150)


def test_a_quote_counts_tool_definitions_and_the_response_schema(db: Database) -> None:
    pricing.seed_prices(db, [SPEC])
    price = pricing.current_price(db, model="m1")
    messages = [{"role": "user", "content": "hello world"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    bare = pricing.quote_worst_case(price, SPEC, messages=messages, max_tokens=10)
    with_tools = pricing.quote_worst_case(
        price, SPEC, messages=messages, max_tokens=10, tools=tools
    )
    with_schema = pricing.quote_worst_case(
        price, SPEC, messages=messages, max_tokens=10, response_format=schema
    )
    assert with_tools.prompt_tokens > bare.prompt_tokens
    assert with_schema.prompt_tokens > bare.prompt_tokens


def test_embedding_models_are_seeded_with_no_output_price(db: Database) -> None:
    spec = EmbeddingModelSpec(id="e1", input_per_mtok=100)
    (price,) = pricing.seed_prices(db, [spec])
    assert (price.model, price.input_per_mtok, price.output_per_mtok) == ("e1", 100, 0)
    quote = pricing.quote_embeddings(price, input_tokens=20_001)
    assert quote.credits == 3  # ceil(20_001 * 100 / 1M)
