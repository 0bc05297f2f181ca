"""The one settings object: defaults that run anywhere, and URLs people actually paste."""

import pytest

from aicredits.settings import Settings, normalise_database_url


def test_default_database_is_a_local_sqlite_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = Settings(_env_file=None)
    assert settings.database_url.startswith("sqlite:///")


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u@h/db",
        "postgresql://u@h/db",
        "postgresql+psycopg://u@h/db",
    ],
)
def test_postgres_urls_use_psycopg3(url: str) -> None:
    assert normalise_database_url(url) == "postgresql+psycopg://u@h/db"


def test_database_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db/prod")
    settings = Settings(_env_file=None)
    assert settings.database_url == "postgresql+psycopg://app@db/prod"


def test_models_can_be_configured_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "MODELS",
        '[{"id": "gpt-4o-mini", "input_per_mtok": 150, "output_per_mtok": 600}]',
    )
    settings = Settings(_env_file=None)
    spec = settings.model_spec("gpt-4o-mini")
    assert spec is not None
    assert (spec.input_per_mtok, spec.output_per_mtok) == (150, 600)
    assert settings.model_spec("demo-model") is None
