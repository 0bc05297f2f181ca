"""The models and the migrations agree, on SQLite and on Postgres, both ways."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import aicredits.adapters.tables  # noqa: F401
from aicredits.adapters.db import create_db_engine
from aicredits.adapters.migrations import alembic_config, upgrade_to_head
from tests.dbutil import PG_ADMIN_URL, pg_conninfo
from tests.servers import silent_port


def _diff(url: str) -> list[object]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, SQLModel.metadata))
    finally:
        engine.dispose()


@contextmanager
def _fresh_postgres_database(tmp_path: Path) -> Iterator[str]:
    name = f"aicredits_migr_{tmp_path.name[-12:].replace('-', '_').lower()}"
    with psycopg.connect(pg_conninfo(PG_ADMIN_URL), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield "postgresql+psycopg://" + pg_conninfo(PG_ADMIN_URL, name).split("://", 1)[1]
    finally:
        with psycopg.connect(pg_conninfo(PG_ADMIN_URL), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with _fresh_postgres_database(tmp_path) as url:
        yield url


@pytest.fixture
def empty_pg_url(tmp_path: Path) -> Iterator[str]:
    with _fresh_postgres_database(tmp_path) as url:
        yield url


def test_upgrade_head_leaves_no_autogenerate_diff(empty_url: str) -> None:
    upgrade_to_head(empty_url)
    assert _diff(empty_url) == []


def test_an_unmigrated_database_does_differ(empty_url: str) -> None:
    # Guards the test above: the comparison really sees the tables.
    assert _diff(empty_url) != []


def test_downgrade_to_base_and_upgrade_again(empty_url: str) -> None:
    config = alembic_config(empty_url)
    command.upgrade(config, "head")
    command.downgrade(config, "base")
    command.upgrade(config, "head")
    assert _diff(empty_url) == []


def test_there_is_exactly_one_head() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


@pytest.mark.postgres
def test_several_processes_migrating_at_once_all_succeed(empty_pg_url: str) -> None:
    """Workers or containers started together each migrate on start: on Postgres an advisory
    lock makes them take turns, so none fails on a table another is creating."""
    empty_url = empty_pg_url
    code = (
        "import sys; from aicredits.adapters.migrations import upgrade_to_head; "
        "upgrade_to_head(sys.argv[1])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, empty_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=120)[0].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], "\n".join(outputs)
    assert _diff(empty_url) == []


def test_migrating_a_database_that_does_not_answer_fails_within_seconds() -> None:
    """Every `prod` start migrates first: a database host that accepts connections and says
    nothing stopped the start for ever (no connect timeout on the migration's lock)."""
    with silent_port() as port:
        began = time.monotonic()
        with pytest.raises(sa.exc.OperationalError):
            upgrade_to_head(f"postgresql+psycopg://app@127.0.0.1:{port}/aicredits")
    assert time.monotonic() - began < 15
