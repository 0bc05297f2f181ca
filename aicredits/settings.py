"""The one reader of the environment.

Every knob has an embedded default that works on a fresh machine; setting the variable swaps
the simulated part for the real one (see README, "Configuration").
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ModelSpec(BaseModel):
    """A chat model the operator offers, with its default price (credits per 1M tokens).

    The price here only seeds the versioned price table the first time a model is seen;
    afterwards the table is the source of truth and admins add versions to it.
    """

    id: str = Field(min_length=1, max_length=100)
    label: str = ""
    input_per_mtok: int = Field(ge=0)
    output_per_mtok: int = Field(ge=0)
    max_output_tokens: int = Field(default=1024, gt=0)
    context_tokens: int = Field(default=16_384, gt=0)


DEFAULT_MODELS: list[ModelSpec] = [
    ModelSpec(
        id="demo-model",
        label="Demo model (local fake upstream)",
        input_per_mtok=2_000,
        output_per_mtok=8_000,
        max_output_tokens=1024,
        context_tokens=16_384,
    )
]


def normalise_database_url(url: str) -> str:
    """Accept the URL spellings people paste and pick the psycopg 3 driver for Postgres."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    environment: Literal["dev", "prod"] = Field(default="dev", alias="AICREDITS_ENV")
    database_url: str = "sqlite:///data/aicredits.db"
    models: list[ModelSpec] = Field(default_factory=lambda: list(DEFAULT_MODELS))

    @field_validator("database_url")
    @classmethod
    def _normalise_url(cls, value: str) -> str:
        return normalise_database_url(value)

    def model_spec(self, model_id: str) -> ModelSpec | None:
        return next((m for m in self.models if m.id == model_id), None)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
