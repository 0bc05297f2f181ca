"""Production refuses every development default: a valid set passes, each break is named."""

from __future__ import annotations

import pytest

from aicredits.services.production import (
    production_problems,
    refusal_message,
    refuse_unless_ready,
)
from aicredits.settings import Settings

VALID_PROD: dict[str, object] = {
    "AICREDITS_ENV": "prod",
    "database_url": "postgresql://app@db.internal/aicredits",
    "redis_url": "redis://redis.internal:6379/0",
    "public_url": "https://credits.example.test",
    "session_secret": "f" * 64,
    "oidc_issuer": "https://idp.example.test",
    "oidc_client_id": "client",
    "oidc_client_secret": "client-secret",
    "openai_api_key": "sk-test-not-a-real-key",
    "stripe_secret_key": "sk_test_not_a_real_key",
    "stripe_webhook_secret": "whsec_not_a_real_secret",
}


def _settings(**changes: object) -> Settings:
    return Settings(_env_file=None, **{**VALID_PROD, **changes})  # type: ignore[arg-type]


def test_a_complete_production_configuration_has_no_problems() -> None:
    settings = _settings()
    assert production_problems(settings) == []
    refuse_unless_ready(settings)  # does not raise


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"session_secret": ""}, "SESSION_SECRET"),
        ({"session_secret": "short"}, "SESSION_SECRET"),
        ({"oidc_issuer": "", "oidc_client_id": "", "oidc_client_secret": ""}, "OIDC_ISSUER"),
        ({"oidc_client_secret": ""}, "GOOGLE_CLIENT_ID"),
        ({"stripe_secret_key": ""}, "STRIPE_SECRET_KEY"),
        ({"stripe_webhook_secret": ""}, "STRIPE_WEBHOOK_SECRET"),
        ({"openai_api_key": ""}, "OPENAI_API_KEY"),
        ({"database_url": "sqlite:///data/aicredits.db"}, "DATABASE_URL"),
        ({"redis_url": ""}, "REDIS_URL"),
        ({"public_url": "http://credits.example.test"}, "PUBLIC_URL"),
        ({"api_url": "http://credits.example.test:8000"}, "API_URL"),
    ],
)
def test_each_development_default_is_one_named_problem(
    change: dict[str, object], variable: str
) -> None:
    problems = production_problems(_settings(**change))
    assert len(problems) == 1, problems
    assert variable in problems[0]


def test_sqlite_passes_when_explicitly_allowed() -> None:
    settings = _settings(database_url="sqlite:///data/aicredits.db", allow_sqlite_in_prod=True)
    assert production_problems(settings) == []


@pytest.mark.parametrize(
    "provider",
    [
        {"google_client_id": "g", "google_client_secret": "gs"},
        {"github_client_id": "h", "github_client_secret": "hs"},
    ],
)
def test_any_real_sign_in_provider_counts(provider: dict[str, object]) -> None:
    no_oidc = {"oidc_issuer": "", "oidc_client_id": "", "oidc_client_secret": ""}
    assert production_problems(_settings(**no_oidc, **provider)) == []


def test_api_url_defaults_to_the_public_url_in_production() -> None:
    assert _settings().api_url == "https://credits.example.test"


def test_development_defaults_are_all_reported_together() -> None:
    blank: dict[str, object] = {key: "" for key in VALID_PROD if key != "AICREDITS_ENV"}
    blank.update(database_url="sqlite:///x.db", public_url="http://localhost:3000")
    problems = production_problems(_settings(**blank))
    named = " ".join(problems)
    for variable in (
        "SESSION_SECRET",
        "OIDC_ISSUER",
        "STRIPE_SECRET_KEY",
        "STRIPE_WEBHOOK_SECRET",
        "OPENAI_API_KEY",
        "DATABASE_URL",
        "REDIS_URL",
        "PUBLIC_URL",
    ):
        assert variable in named


def test_the_app_refuses_to_start_in_production_listing_every_problem() -> None:
    settings = _settings(stripe_webhook_secret="", redis_url="")
    with pytest.raises(SystemExit) as refused:
        refuse_unless_ready(settings)
    message = str(refused.value.code)
    assert message == refusal_message(production_problems(settings))
    assert "STRIPE_WEBHOOK_SECRET" in message
    assert "REDIS_URL" in message


def test_development_is_never_refused() -> None:
    refuse_unless_ready(Settings(_env_file=None, AICREDITS_ENV="dev"))


def test_a_placeholder_left_from_env_example_is_a_problem() -> None:
    problems = production_problems(_settings(stripe_secret_key="replace-with-sk_live-key"))
    assert problems == [
        "STRIPE_SECRET_KEY is still the placeholder from .env.example: set the real value."
    ]
