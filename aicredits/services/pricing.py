"""Model prices: the versioned price table, quotes before a call, costs after it, and the
admin console's price page (new versions, with their audit row, and every version listed)."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from aicredits.adapters.db import Database, reading, unit_of_work
from aicredits.adapters.tables import model_prices, utcnow
from aicredits.adapters.tokenizer import count_prompt_tokens
from aicredits.domain.chat import ChatRequest
from aicredits.domain.errors import InvalidRequest, UnknownModel
from aicredits.domain.ledger import require_non_negative, require_reason
from aicredits.domain.pricing import Price, clamp_max_tokens, usage_cost, worst_case_cost
from aicredits.services.admin_actions import (
    ActionKind,
    ActionResult,
    AdminActor,
    AdminError,
    InvalidEffectiveDate,
    earlier_use,
    once_per_form,
    record_action,
    require_form_token,
    utc_minute,
)
from aicredits.settings import EmbeddingModelSpec, ModelSpec

# Far beyond any real price, and well inside BIGINT: a typo of extra digits is refused.
MAX_PRICE_PER_MTOK = 10**12


@dataclass(frozen=True, slots=True)
class Quote:
    """The most a call can cost, reserved before it starts."""

    price: Price
    # The prompt as counted here (images at the model's bound): what the call is charged
    # for its input when the provider's usage never comes (a cut or crashed stream).
    prompt_tokens: int
    # The output cap of one choice: what the upstream is told.
    max_output_tokens: int
    credits: int
    # How many choices share the call: the output cap is reserved for each.
    choices: int = 1


def _price(row: Any) -> Price:
    return Price(
        version_id=row.id,
        model=row.model,
        input_per_mtok=row.input_per_mtok,
        output_per_mtok=row.output_per_mtok,
    )


def current_price(
    target: Database | Connection, *, model: str, at: datetime | None = None
) -> Price:
    """The price version in effect for `model` at `at` (now by default)."""
    at = at or utcnow()
    with reading(target) as conn:
        row = conn.execute(
            sa.select(model_prices)
            .where(model_prices.c.model == model, model_prices.c.effective_from <= at)
            .order_by(model_prices.c.effective_from.desc(), model_prices.c.id.desc())
            .limit(1)
        ).first()
    if row is None:
        raise UnknownModel(f"model {model!r} has no price")
    return _price(row)


PRICE_CACHE_SECONDS = 5.0
_price_cache: dict[tuple[str, str], tuple[float, Price]] = {}


def price_version(db: Database, *, version_id: int) -> Price:
    """One version of a price, by id: what a call reserved at that version is charged by."""
    with db.read() as conn:
        row = conn.execute(sa.select(model_prices).where(model_prices.c.id == version_id)).first()
    if row is None:
        raise UnknownModel(f"no price version {version_id}")
    return _price(row)


def cached_price(db: Database, *, model: str) -> Price | None:
    """recent_price if it is remembered (no database call, so no thread needed)."""
    cached = _price_cache.get((db.url, model))
    return cached[1] if cached is not None and cached[0] > time.monotonic() else None


def recent_price(db: Database, *, model: str) -> Price:
    """current_price, remembered for a few seconds: every metered call needs it, and a new
    price version may take that long to apply (each call still records the version it
    used)."""
    key = (db.url, model)
    cached = _price_cache.get(key)
    now = time.monotonic()
    if cached is not None and cached[0] > now:
        return cached[1]
    price = current_price(db, model=model)
    _price_cache[key] = (now + PRICE_CACHE_SECONDS, price)
    return price


def price_history(db: Database, *, model: str) -> list[Price]:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(model_prices)
            .where(model_prices.c.model == model)
            .order_by(model_prices.c.effective_from, model_prices.c.id)
        ).all()
    return [_price(r) for r in rows]


def add_price_version(
    target: Database | Connection,
    *,
    model: str,
    input_per_mtok: int,
    output_per_mtok: int,
    actor: str,
    effective_from: datetime | None = None,
    now: datetime | None = None,
) -> Price:
    """Add a new price for a model, now or from a later date. Old versions stay untouched.
    Given a connection, the row is part of the caller's transaction."""
    model = model.strip()
    if not model:
        raise UnknownModel("a model id is required")
    require_non_negative(input_per_mtok, "input price")
    require_non_negative(output_per_mtok, "output price")
    now = now or utcnow()
    with unit_of_work(target) as conn:
        row = conn.execute(
            sa.insert(model_prices)
            .values(
                model=model,
                input_per_mtok=input_per_mtok,
                output_per_mtok=output_per_mtok,
                effective_from=effective_from or now,
                created_at=now,
                created_by=actor,
            )
            .returning(model_prices)
        ).one()
    return _price(row)


def seed_prices(db: Database, models: Iterable[ModelSpec | EmbeddingModelSpec]) -> list[Price]:
    """Give each configured model its configured price, unless the table already has one."""
    added = []
    with db.read() as conn:
        priced = set(conn.execute(sa.select(model_prices.c.model).distinct()).scalars())
    for spec in models:
        if spec.id not in priced:
            added.append(
                add_price_version(
                    db,
                    model=spec.id,
                    input_per_mtok=spec.input_per_mtok,
                    output_per_mtok=spec.output_per_mtok,
                    actor="config",
                    effective_from=datetime(2000, 1, 1, tzinfo=utcnow().tzinfo),
                )
            )
    return added


def quote_worst_case(
    price: Price,
    spec: ModelSpec,
    *,
    messages: Sequence[Mapping[str, Any]],
    max_tokens: int | None,
    tools: Any = None,
    response_format: Any = None,
    images: int = 0,
    choices: int = 1,
) -> Quote:
    """Price the worst case: every prompt token (counted with tiktoken: messages, tool
    definitions, the response format's schema), each image at the model's bound, plus the
    output cap for each choice. Reasoning tokens are output, bounded by the same cap."""
    if not messages:
        raise InvalidRequest("messages must not be empty")
    text_tokens = count_prompt_tokens(messages, tools=tools, response_format=response_format)
    max_output = clamp_max_tokens(max_tokens, model_limit=spec.max_output_tokens)
    # Images are left out of the context check: their bound is far above a typical image.
    if text_tokens + max_output > spec.context_tokens:
        allowed = spec.context_tokens - max_output
        raise InvalidRequest(
            f"the prompt is {text_tokens} tokens; {spec.id} allows at most {allowed} "
            f"with {max_output} output tokens"
        )
    prompt_tokens = text_tokens + images * spec.max_image_tokens
    credits = worst_case_cost(
        price, prompt_tokens=prompt_tokens, max_output_tokens=choices * max_output
    )
    return Quote(
        price=price,
        prompt_tokens=prompt_tokens,
        max_output_tokens=max_output,
        credits=credits,
        choices=choices,
    )


def quote_request(price: Price, spec: ModelSpec, request: ChatRequest) -> Quote:
    """quote_worst_case for everything a chat request asks for."""
    return quote_worst_case(
        price,
        spec,
        messages=request.messages,
        max_tokens=request.max_tokens,
        tools=request.tools,
        response_format=request.response_format,
        images=request.images,
        choices=request.n,
    )


def quote_embeddings(price: Price, *, input_tokens: int) -> Quote:
    """An embedding call costs its input tokens, all known before the call."""
    credits = usage_cost(price, input_tokens=input_tokens, output_tokens=0)
    return Quote(price=price, prompt_tokens=input_tokens, max_output_tokens=0, credits=credits)


def price_usage(price: Price, *, input_tokens: int, output_tokens: int) -> int:
    """What a finished call costs, from its actual token counts."""
    return usage_cost(price, input_tokens=input_tokens, output_tokens=output_tokens)


# --- prices the admins set ------------------------------------------------------------------


def add_price_by_admin(
    db: Database,
    *,
    actor: AdminActor,
    model: str,
    input_per_mtok: int,
    output_per_mtok: int,
    reason: str,
    form_token: str,
    known_models: Collection[str],
    effective_from: datetime | None = None,
    now: datetime | None = None,
) -> ActionResult:
    """A new price version for a model, from now or a later moment, with its audit row in the
    same transaction. Earlier versions stay, and every usage event keeps the version it was
    charged at."""
    now = now or utcnow()
    token = require_form_token(form_token)
    reason = require_reason(reason)
    model = model.strip()
    if model not in known_models:
        raise UnknownModel(f"There is no model called {model!r} here.")
    for value, what in ((input_per_mtok, "input price"), (output_per_mtok, "output price")):
        require_non_negative(value, what)
        if value > MAX_PRICE_PER_MTOK:
            raise AdminError(f"The {what} is too large.")
    starts = effective_from or now
    if starts < now - timedelta(minutes=1):
        # A past start would change which price "was in force" for calls already charged.
        raise InvalidEffectiveDate("A new price cannot start in the past: choose now or later.")
    detail = (
        f"{model}: {input_per_mtok:,} input / {output_per_mtok:,} output credits per 1M tokens, "
        f"from {utc_minute(starts)}"
    )

    def act(conn: Connection) -> ActionResult:
        first = earlier_use(conn, token, ActionKind.ADD_PRICE, None)
        if first is not None:
            return first
        # Price rows carry no idempotency key of their own: the audit row's token is theirs.
        result = record_action(
            conn,
            actor=actor,
            action=ActionKind.ADD_PRICE,
            target_user_id=None,
            detail=detail,
            reason=reason,
            token=token,
            now=now,
        )
        add_price_version(
            conn,
            model=model,
            input_per_mtok=input_per_mtok,
            output_per_mtok=output_per_mtok,
            actor=actor.ledger_actor,
            effective_from=starts,
            now=now,
        )
        return result

    try:
        return once_per_form(db, token, act)
    except sa.exc.IntegrityError:
        raise AdminError(
            f"{model} already has a price starting at exactly that moment; choose another."
        ) from None


@dataclass(frozen=True, slots=True)
class PriceVersionView:
    version_id: int
    model: str
    input_per_mtok: int
    output_per_mtok: int
    effective_from: datetime
    created_at: datetime
    created_by: str
    status: str  # current | scheduled | past


@dataclass(frozen=True, slots=True)
class ModelPrices:
    model: str
    configured: bool
    current: PriceVersionView | None
    # Every version, newest start first.
    versions: list[PriceVersionView]


def list_prices(
    db: Database, *, configured_models: Sequence[str], now: datetime | None = None
) -> list[ModelPrices]:
    """Each model's price now and its whole history: configured models first, then any
    model that only the price table still knows."""
    now = now or utcnow()
    with db.read() as conn:
        rows = conn.execute(
            sa.select(model_prices).order_by(
                model_prices.c.model,
                model_prices.c.effective_from.desc(),
                model_prices.c.id.desc(),
            )
        ).all()
    by_model: dict[str, list[Any]] = {}
    for row in rows:
        by_model.setdefault(row.model, []).append(row)
    names = list(dict.fromkeys([*configured_models, *sorted(by_model)]))
    result = []
    for name in names:
        versions = by_model.get(name, [])
        # Rows are newest start first; the first that has started is in force.
        current_id = next((r.id for r in versions if r.effective_from <= now), None)
        views = [
            PriceVersionView(
                version_id=r.id,
                model=r.model,
                input_per_mtok=r.input_per_mtok,
                output_per_mtok=r.output_per_mtok,
                effective_from=r.effective_from,
                created_at=r.created_at,
                created_by=r.created_by,
                status=(
                    "current"
                    if r.id == current_id
                    else "scheduled"
                    if r.effective_from > now
                    else "past"
                ),
            )
            for r in versions
        ]
        result.append(
            ModelPrices(
                model=name,
                configured=name in configured_models,
                current=next((v for v in views if v.status == "current"), None),
                versions=views,
            )
        )
    return result
