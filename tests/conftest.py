"""Shared fixtures: migrated databases on SQLite and on the real Postgres.

Postgres: each pytest run creates its own database on the server named by
AICREDITS_TEST_PG_URL (default: the local server, trust auth) and drops it at the end.
`make test` starts the server when it is down; run by hand without it, the Postgres tests
fail with a message saying so rather than skipping silently.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import sqlalchemy as sa

from aicredits.adapters.db import Database
from aicredits.adapters.migrations import upgrade_to_head
from aicredits.services import pricing
from tests.dbutil import PG_ADMIN_URL, empty_postgres, pg_conninfo


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated Postgres database for this test run."""
    name = f"aicredits_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(pg_conninfo(PG_ADMIN_URL), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({exc}). `make test` starts it; "
            "see ../shared/ENVIRONMENT.md or docs/testing.md.",
            pytrace=False,
        )
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = "postgresql+psycopg://" + pg_conninfo(PG_ADMIN_URL, name).split("://", 1)[1]
    upgrade_to_head(url)
    try:
        yield url
    finally:
        with psycopg.connect(pg_conninfo(PG_ADMIN_URL), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis (`make test` starts it). Keys written by tests use their own prefixes."""
    url = os.environ.get("AICREDITS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.exceptions.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {url} ({exc}); `make test` starts it.", pytrace=False
        )
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file; each test gets a copy, which is faster than migrating again."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    url = f"sqlite:///{path}"
    upgrade_to_head(url)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.exec_driver_sql("PRAGMA journal_mode=DELETE")
    engine.dispose()
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "aicredits.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty, migrated database: once on SQLite, once on Postgres."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    url = str(request.getfixturevalue("pg_url"))
    empty_postgres(url)
    # Emptying restarts the ids, so a price version remembered for this URL by an earlier
    # test (services.pricing, for 5 s) would name another row or none. In a real database a
    # version is never deleted, so the cache is only stale across tests.
    pricing._price_cache.clear()
    return url


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    try:
        yield database
    finally:
        database.dispose()
