"""The connection settings every Postgres connection gets unless its URL says otherwise."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from aicredits.adapters.db import PG_CONNECTION_DEFAULTS, with_connection_defaults


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_a_postgres_url_gets_every_default() -> None:
    url = with_connection_defaults("postgres://app:secret@db:5432/prod")
    assert url.startswith("postgresql+psycopg://app:secret@db:5432/prod?")
    assert query(url) == PG_CONNECTION_DEFAULTS


def test_what_the_url_sets_wins_and_the_rest_is_added() -> None:
    url = with_connection_defaults(
        "postgresql+psycopg://app:p%40ss@db/prod?connect_timeout=30&sslmode=require"
    )
    assert "app:p%40ss@db" in url  # the password kept, still escaped
    assert query(url) == {**PG_CONNECTION_DEFAULTS, "connect_timeout": "30", "sslmode": "require"}


def test_sqlite_is_left_alone() -> None:
    assert (
        with_connection_defaults("sqlite:///.data/aicredits.db") == "sqlite:///.data/aicredits.db"
    )


def test_the_defaults_bound_a_dead_database() -> None:
    # Connect within seconds, and notice a gone peer within a minute; values libpq takes.
    assert int(PG_CONNECTION_DEFAULTS["connect_timeout"]) <= 10
    idle, interval, count = (
        int(PG_CONNECTION_DEFAULTS[k])
        for k in ("keepalives_idle", "keepalives_interval", "keepalives_count")
    )
    assert idle + interval * count <= 60
    assert int(PG_CONNECTION_DEFAULTS["tcp_user_timeout"]) <= 60_000
