"""What the deployment offers, for display: models with their current prices, and which
parts run simulated."""

from __future__ import annotations

from dataclasses import dataclass

from aicredits.adapters.db import Database
from aicredits.domain.errors import UnknownModel
from aicredits.domain.pricing import credits_per_1k
from aicredits.services.pricing import current_price
from aicredits.settings import Settings


@dataclass(frozen=True, slots=True)
class ModelOffer:
    id: str
    label: str
    input_per_1k: str
    output_per_1k: str


def list_model_offers(db: Database, settings: Settings) -> list[ModelOffer]:
    offers = []
    for spec in settings.models:
        try:
            price = current_price(db, model=spec.id)
        except UnknownModel:
            continue  # not priced yet: not offered
        offers.append(
            ModelOffer(
                id=spec.id,
                label=spec.label or spec.id,
                input_per_1k=credits_per_1k(price.input_per_mtok),
                output_per_1k=credits_per_1k(price.output_per_mtok),
            )
        )
    return offers


def list_embedding_offers(db: Database, settings: Settings) -> list[ModelOffer]:
    """The embedding models, priced per input token (they have no output)."""
    offers = []
    for spec in settings.embedding_models:
        try:
            price = current_price(db, model=spec.id)
        except UnknownModel:
            continue
        offers.append(
            ModelOffer(
                id=spec.id,
                label=spec.label or spec.id,
                input_per_1k=credits_per_1k(price.input_per_mtok),
                output_per_1k=credits_per_1k(0),
            )
        )
    return offers


def describe_database(settings: Settings) -> str:
    if settings.database_url.startswith("sqlite"):
        return "SQLite (local file, development default)"
    return "PostgreSQL"
