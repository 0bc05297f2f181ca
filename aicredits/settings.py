"""The one reader of the environment.

Every knob has an embedded default that works on a fresh machine; setting the variable swaps
the simulated part for the real one (docs/deployment.md, "Every setting").
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ModelSpec(BaseModel):
    """A chat model the operator offers, with its default price (credits per 1M tokens).

    The price here only seeds the versioned price table the first time a model is seen;
    afterwards the table is the source of truth and admins add versions to it.
    """

    id: str = Field(min_length=1, max_length=100)
    label: str = ""
    # The name the upstream knows it by, when it differs (e.g. "openai/gpt-4o-mini" on
    # OpenRouter).
    upstream_id: str = ""
    input_per_mtok: int = Field(ge=0)
    output_per_mtok: int = Field(ge=0)
    max_output_tokens: int = Field(default=1024, gt=0)
    context_tokens: int = Field(default=16_384, gt=0)
    # Takes image_url parts. Each image is reserved at `max_image_tokens`, the most one image
    # can cost on this model (the charge follows the provider's usage).
    vision: bool = False
    max_image_tokens: int = Field(default=1_445, gt=0)
    # A reasoning model: sent `max_completion_tokens` (which bounds its reasoning tokens
    # too) instead of `max_tokens`, and takes `reasoning_effort`.
    reasoning: bool = False

    @property
    def upstream_model(self) -> str:
        return self.upstream_id or self.id


class EmbeddingModelSpec(BaseModel):
    """An embedding model the operator offers on /v1/embeddings, priced per 1M input tokens
    (seeded into the same versioned price table, with no output price)."""

    id: str = Field(min_length=1, max_length=100)
    label: str = ""
    upstream_id: str = ""
    input_per_mtok: int = Field(ge=0)
    # The most tokens one input may have, and how many inputs one request may carry.
    max_input_tokens: int = Field(default=8_191, gt=0)
    max_inputs: int = Field(default=2_048, gt=0)
    # Whether the model takes `dimensions` (text-embedding-3 and later do).
    dimensions: bool = True

    @property
    def upstream_model(self) -> str:
        return self.upstream_id or self.id

    @property
    def output_per_mtok(self) -> int:
        return 0


DEFAULT_MODELS: list[ModelSpec] = [
    ModelSpec(
        id="demo-model",
        label="Demo model (local fake upstream)",
        input_per_mtok=2_000,
        output_per_mtok=8_000,
        max_output_tokens=1024,
        context_tokens=16_384,
        vision=True,
        max_image_tokens=765,
    )
]
DEFAULT_EMBEDDING_MODELS: list[EmbeddingModelSpec] = [
    EmbeddingModelSpec(
        id="demo-embedding", label="Demo embeddings (local fake upstream)", input_per_mtok=50
    )
]

# With a real OPENAI_API_KEY and no MODELS, this is offered. 1 credit = 0.001 USD at the
# default packs; these prices are twice OpenAI's list price for the model.
DEFAULT_OPENAI_MODELS: list[ModelSpec] = [
    ModelSpec(
        id="gpt-4o-mini",
        label="GPT-4o mini",
        input_per_mtok=300,
        output_per_mtok=1_200,
        max_output_tokens=4_096,
        context_tokens=128_000,
        vision=True,
        # 2,833 + 5,667 per 512-px tile, at most 8 tiles: gpt-4o-mini counts an image in
        # many cheap tokens.
        max_image_tokens=48_169,
    )
]
DEFAULT_OPENAI_EMBEDDING_MODELS: list[EmbeddingModelSpec] = [
    EmbeddingModelSpec(
        id="text-embedding-3-small", label="Text embedding 3 small", input_per_mtok=40
    )
]
FAKE_UPSTREAM_URL = "http://127.0.0.1:9500/v1"
DEV_DRAIN_GRACE_SECONDS = 1.0


class CreditPack(BaseModel):
    """What "Buy" sells: a number of credits for a Stripe Price, or for an amount in minor
    units of a currency (5 USD = amount 500, currency "usd")."""

    id: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9_-]+$")
    label: str = ""
    credits: int = Field(gt=0)
    price_id: str = ""
    amount: int = Field(default=0, ge=0)
    currency: str = Field(default="usd", min_length=3, max_length=3)

    @model_validator(mode="after")
    def _priced(self) -> CreditPack:
        if not self.price_id and self.amount <= 0:
            raise ValueError(f"pack {self.id!r} needs a price_id or an amount")
        return self


class Plan(BaseModel):
    """A monthly subscription: a Stripe Price (or, in the simulated checkout, an amount in
    minor units of a currency) buying `included_credits` each period, expiring at its end.

    `overage` says what happens past them (docs/plans.md): `block` and `prepaid` stop at the
    plan's credits plus any packs; `metered` also grants a credit line of
    `metered_ceiling_credits` per period. `usable_when_past_due`: whether calls go on during
    Stripe's retries of a failed payment."""

    id: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9_-]+$")
    label: str = ""
    included_credits: int = Field(gt=0)
    price_id: str = ""
    amount: int = Field(default=0, ge=0)
    currency: str = Field(default="usd", min_length=3, max_length=3)
    overage: Literal["block", "prepaid", "metered"] = "prepaid"
    metered_ceiling_credits: int = Field(default=0, ge=0)
    # `metered`: the Stripe Price of one credit of overage, invoiced per period.
    overage_price_id: str = ""
    usable_when_past_due: bool = True

    @model_validator(mode="after")
    def _priced(self) -> Plan:
        if not self.price_id and self.amount <= 0:
            raise ValueError(f"plan {self.id!r} needs a price_id or an amount")
        if self.overage == "metered" and self.metered_ceiling_credits <= 0:
            raise ValueError(f"metered plan {self.id!r} needs metered_ceiling_credits")
        return self


DEFAULT_PLANS: list[Plan] = [
    Plan(id="team", label="Team", included_credits=25_000, amount=2_000, currency="usd"),
    Plan(id="pro", label="Pro", included_credits=70_000, amount=5_000, currency="usd"),
]


DEFAULT_PACKS: list[CreditPack] = [
    CreditPack(id="starter", label="Starter", credits=5_000, amount=500, currency="usd"),
    CreditPack(id="plus", label="Plus", credits=22_000, amount=2_000, currency="usd"),
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
    database_url: str = "sqlite:///.data/aicredits.db"
    # Production refuses SQLite (one machine, one writer) unless this says it is meant.
    allow_sqlite_in_prod: bool = False
    models: list[ModelSpec] = Field(default_factory=lambda: list(DEFAULT_MODELS))
    embedding_models: list[EmbeddingModelSpec] = Field(
        default_factory=lambda: list(DEFAULT_EMBEDDING_MODELS)
    )

    # Where users reach the app, and where the browser reaches the backend. In production
    # (single port) they are the same; `reflex run` in development serves them on two ports.
    public_url: str = "http://localhost:3000"
    api_url: str = "http://localhost:8000"

    # Sign-in
    session_days: int = Field(default=14, gt=0)
    # The HMAC key for the stored hashes of session tokens, sign-in states and API keys.
    # Required in production; in development one is generated into .data/session_secret.
    session_secret: SecretStr = SecretStr("")
    admin_emails: Annotated[list[str], NoDecode] = Field(default_factory=list)
    free_trial_credits: int = Field(default=1000, ge=0)
    free_trial_days: int = Field(default=30, gt=0)
    # New accounts that get the free trial, per client address (an IPv6 client: per /64)
    # per UTC day; later ones that day are created without it. 0: no limit.
    trials_per_address_per_day: int = Field(default=3, ge=0)
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

    # The model provider. With no key, the local fake upstream serves a demo model.
    openai_api_key: str = ""
    openai_base_url: str = ""
    upstream_connect_timeout: float = Field(default=5.0, gt=0)
    upstream_read_timeout: float = Field(default=60.0, gt=0)
    upstream_retries: int = Field(default=2, ge=0, le=5)
    # A reply is cut after this long.
    upstream_max_seconds: float = Field(default=300.0, gt=0)

    # Replies in flight. The worker running a call renews its hold's lease and checkpoints
    # how much it has delivered every STREAM_CHECKPOINT_SECONDS; a hold whose lease lapsed
    # (its worker was killed) is settled for that much by the sweeper, which runs every
    # HOLD_SWEEP_INTERVAL_SECONDS. On SIGTERM a worker lets its replies finish for up to
    # DRAIN_GRACE_SECONDS, then cuts them and settles each for what it delivered.
    hold_lease_seconds: float = Field(default=30.0, gt=0)
    stream_checkpoint_seconds: float = Field(default=2.0, gt=0)
    hold_sweep_interval_seconds: float = Field(default=5.0, gt=0)
    drain_grace_seconds: float = Field(default=20.0, ge=0)

    # Limits before any credit is reserved (0 turns one off).
    redis_url: str = ""
    rate_limit_user_per_minute: int = Field(default=30, ge=0)
    rate_limit_ip_per_minute: int = Field(default=120, ge=0)
    rate_limit_concurrent: int = Field(default=4, ge=0)
    # What to do when Redis is down: refuse calls (closed) or let them through (open).
    rate_limit_fail_open: bool = False
    max_request_bytes: int = Field(default=1_000_000, gt=0)
    # The proxies in front (TLS terminator, load balancer), by address or CIDR network. Only
    # a request whose peer is one of them has its client taken from X-Forwarded-For (and its
    # scheme from X-Forwarded-Proto). Empty: the peer is the client, whatever it sends.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Payments. With no key, a clearly labelled simulated checkout runs the whole fulfilment
    # path locally, signing its events with a dev secret generated on first use.
    stripe_secret_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_api_base: str = ""  # another base address for the SDK (tests: a local fake)
    packs: list[CreditPack] = Field(default_factory=lambda: list(DEFAULT_PACKS))
    # Monthly plans (docs/plans.md), sold by Stripe Checkout in subscription mode.
    plans: list[Plan] = Field(default_factory=lambda: list(DEFAULT_PLANS))

    # Auto top-up (a user's saved card buys a pack when their credits run low): the top-ups
    # per month a user gets until they change it, how many failures in a row turn it off,
    # how long after a failure it tries again, and how often the job looks for low accounts.
    auto_topup_monthly_cap: int = Field(default=4, ge=1, le=100)
    auto_topup_max_failures: int = Field(default=3, ge=1, le=20)
    auto_topup_retry_minutes: float = Field(default=60.0, ge=0)
    auto_topup_interval_seconds: float = Field(default=5.0, gt=0)

    # Warnings: a banner (and an email, with SMTP) when this share of an allowance is used.
    # The last is blocking when it is 100.
    threshold_percents: list[int] = Field(default_factory=lambda: [50, 80, 100])
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_from: str = ""
    smtp_starttls: bool = True

    # Spike alerts for admins: an hour's spend this many times the user's usual hourly
    # spend (over the last 7 days), and at least this many credits.
    spike_factor: float = Field(default=5.0, gt=1)
    spike_min_credits: int = Field(default=100, ge=0)

    # The periodic jobs (expiring grants, emails, spike reports) run inside the app this often.
    jobs_interval_seconds: float = Field(default=60.0, gt=0)

    # Observability. Logs: one JSON object per line (unset: JSON in prod, text in dev).
    log_format: Literal["json", "text"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # /metrics answers a scraper with this Bearer token, or from these networks (CIDRs).
    metrics_token: SecretStr = SecretStr("")
    metrics_allow_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"]
    )

    @field_validator("admin_emails", mode="before")
    @classmethod
    def _split_emails(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("metrics_allow_networks", "trusted_proxies", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("metrics_allow_networks")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad one
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_proxies(cls, value: list[str]) -> list[str]:
        """Each an IP address or a CIDR network, written the canonical way: a host name or
        a typo would otherwise be a proxy that silently never matches."""
        normalised = []
        for entry in value:
            try:
                if "/" in entry:
                    normalised.append(str(ipaddress.ip_network(entry, strict=False)))
                else:
                    normalised.append(str(ipaddress.ip_address(entry)))
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or a CIDR network (such as 10.0.0.5 or "
                    "10.0.0.0/8); list the addresses of your proxies, not host names"
                ) from None
        return normalised

    @property
    def json_logs(self) -> bool:
        """JSON lines unless told otherwise; plain text by default in development."""
        if self.log_format is not None:
            return self.log_format == "json"
        return self.environment == "prod"

    @field_validator("threshold_percents")
    @classmethod
    def _sorted_percents(cls, value: list[int]) -> list[int]:
        if not value or any(p < 1 or p > 100 for p in value):
            raise ValueError("threshold percents must be between 1 and 100")
        return sorted(set(value))

    @property
    def smtp_configured(self) -> bool:
        return bool(self.smtp_host and self.smtp_from)

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

    @field_validator("database_url")
    @classmethod
    def _normalise_url(cls, value: str) -> str:
        return normalise_database_url(value)

    @model_validator(mode="after")
    def _real_models_for_a_real_upstream(self) -> Settings:
        if self.openai_api_key and "models" not in self.model_fields_set:
            object.__setattr__(self, "models", list(DEFAULT_OPENAI_MODELS))
        if self.openai_api_key and "embedding_models" not in self.model_fields_set:
            object.__setattr__(self, "embedding_models", list(DEFAULT_OPENAI_EMBEDDING_MODELS))
        return self

    @model_validator(mode="after")
    def _one_id_per_model(self) -> Settings:
        # Chat and embedding models share the price table, which knows a model by its id.
        ids = [m.id for m in self.models] + [m.id for m in self.embedding_models]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(
                f"model ids must be unique across MODELS and EMBEDDING_MODELS: {repeated}"
            )
        return self

    @model_validator(mode="after")
    def _checkpoints_inside_the_lease(self) -> Settings:
        if self.stream_checkpoint_seconds * 2 > self.hold_lease_seconds:
            raise ValueError(
                "STREAM_CHECKPOINT_SECONDS must be at most half of HOLD_LEASE_SECONDS, so a "
                "live call's lease is renewed before it lapses"
            )
        return self

    @property
    def drain_grace(self) -> float:
        """How long a stopping worker lets replies finish. In development Reflex kills a
        reloading worker 2 s after asking it to stop, so there it cuts them after 1 s."""
        if self.environment == "dev":
            return min(self.drain_grace_seconds, DEV_DRAIN_GRACE_SECONDS)
        return self.drain_grace_seconds

    @model_validator(mode="after")
    def _one_port_in_production(self) -> Settings:
        # `reflex run --env prod` serves the frontend and the backend on one port, so the
        # backend is where users are unless API_URL says otherwise.
        if self.environment == "prod" and "api_url" not in self.model_fields_set:
            object.__setattr__(self, "api_url", self.public_url)
        return self

    @property
    def simulated_checkout(self) -> bool:
        return not self.stripe_secret_key

    def pack(self, pack_id: str) -> CreditPack | None:
        return next((p for p in self.packs if p.id == pack_id), None)

    def plan(self, plan_id: str) -> Plan | None:
        return next((p for p in self.plans if p.id == plan_id), None)

    @property
    def uses_fake_upstream(self) -> bool:
        return not self.openai_api_key

    @property
    def upstream_base_url(self) -> str:
        if self.openai_base_url:
            return self.openai_base_url.rstrip("/")
        return FAKE_UPSTREAM_URL if self.uses_fake_upstream else "https://api.openai.com/v1"

    def model_spec(self, model_id: str) -> ModelSpec | None:
        return next((m for m in self.models if m.id == model_id), None)

    def embedding_model_spec(self, model_id: str) -> EmbeddingModelSpec | None:
        return next((m for m in self.embedding_models if m.id == model_id), None)

    @property
    def priced_models(self) -> list[ModelSpec | EmbeddingModelSpec]:
        """Every model with a row in the price table: chat and embedding models."""
        return [*self.models, *self.embedding_models]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
