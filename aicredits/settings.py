"""The one reader of the environment.

Every knob has an embedded default that works on a fresh machine; setting the variable swaps
the simulated part for the real one (see README, "Configuration").
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from aicredits.adapters import oauth
from aicredits.adapters.oauth import Provider


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


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def normalise_database_url(url: str) -> str:
    """Accept the URL spellings people paste and pick the psycopg 3 driver for Postgres."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    environment: Literal["dev", "prod"] = Field(default="dev", alias="AICREDITS_ENV")
    database_url: str = "sqlite:///data/aicredits.db"
    models: list[ModelSpec] = Field(default_factory=lambda: list(DEFAULT_MODELS))

    # Where users reach the app, and where the browser reaches the backend. In production
    # (single port) they are the same; `reflex run` in development serves them on two ports.
    public_url: str = "http://localhost:3000"
    api_url: str = "http://localhost:8000"

    # Sign-in
    session_days: int = Field(default=14, gt=0)
    admin_emails: Annotated[list[str], NoDecode] = Field(default_factory=list)
    free_trial_credits: int = Field(default=1000, ge=0)
    free_trial_days: int = Field(default=30, gt=0)
    google_client_id: str = ""
    google_client_secret: str = ""
    github_client_id: str = ""
    github_client_secret: str = ""
    oidc_issuer: str = ""  # any OpenID Connect issuer (or its discovery URL)
    oidc_client_id: str = ""
    oidc_client_secret: str = ""
    oidc_label: str = "SSO"
    # The local test issuer (oidc-provider-mock) used when no provider above is configured.
    dev_oidc_issuer: str = "http://127.0.0.1:9400"

    @field_validator("admin_emails", mode="before")
    @classmethod
    def _split_emails(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("public_url", "api_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @property
    def https(self) -> bool:
        return self.public_url.startswith("https://")

    @property
    def allowed_origins(self) -> list[str]:
        """Origins whose pages may open the websocket or post to our routes."""
        return sorted({_origin(self.public_url), _origin(self.api_url)})

    def configured_providers(self) -> list[Provider]:
        providers = []
        if self.google_client_id and self.google_client_secret:
            providers.append(oauth.google(self.google_client_id, self.google_client_secret))
        if self.github_client_id and self.github_client_secret:
            providers.append(oauth.github(self.github_client_id, self.github_client_secret))
        if self.oidc_issuer and self.oidc_client_id and self.oidc_client_secret:
            providers.append(
                oauth.generic_oidc(
                    "oidc",
                    self.oidc_label,
                    self.oidc_issuer,
                    self.oidc_client_id,
                    self.oidc_client_secret,
                )
            )
        return providers

    def sign_in_providers(self) -> list[Provider]:
        """The configured providers; with none, the local dev issuer (development only)."""
        providers = self.configured_providers()
        if not providers and self.environment == "dev":
            providers.append(oauth.dev_issuer(self.dev_oidc_issuer))
        return providers

    @field_validator("database_url")
    @classmethod
    def _normalise_url(cls, value: str) -> str:
        return normalise_database_url(value)

    def model_spec(self, model_id: str) -> ModelSpec | None:
        return next((m for m in self.models if m.id == model_id), None)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
