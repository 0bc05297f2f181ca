"""Helpers for the real Postgres used by the tests."""

from __future__ import annotations

import os
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

PG_ADMIN_URL = os.environ.get(
    "AICREDITS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def pg_conninfo(url: str, dbname: str | None = None) -> str:
    """A libpq URL (no SQLAlchemy driver suffix), optionally for another database."""
    parsed = sa.make_url(url.replace("postgresql+psycopg://", "postgresql://"))
    if dbname:
        parsed = parsed.set(database=dbname)
    return parsed.render_as_string(hide_password=False)


# Every table of the schema but Alembic's own, read from the database, so a table added by
# a migration is emptied too (a hand-kept list had missed five).
_TABLES = (
    "SELECT tablename FROM pg_tables "
    "WHERE schemaname = current_schema() AND tablename <> 'alembic_version'"
)
# Every sequence used since it was (re)started begins again.
_RESTART_SEQUENCES = (
    "SELECT setval(format('%I.%I', schemaname, sequencename)::regclass, start_value, false) "
    "FROM pg_sequences WHERE last_value IS NOT NULL"
)


def tables(conn: psycopg.Connection[Any]) -> list[str]:
    return [name for (name,) in conn.execute(_TABLES).fetchall()]


def _names(names: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, names))


def empty_postgres(url: str) -> None:
    """Empty every table and restart the ids, as before the test's first row.

    DELETE of the few tables a test wrote, in one transaction, with the triggers off
    (`session_replication_role = replica`: the ledger's append-only triggers and the foreign
    keys' checks), takes about 15 ms; TRUNCATE of all of them (28) takes 120 to 250 ms on
    this machine, which is a minute or two over the ~500 tests on Postgres. Only a superuser
    may turn the triggers off; with another role (AICREDITS_TEST_PG_URL) it falls back to
    TRUNCATE, which does not fire row-level triggers.
    """
    with psycopg.connect(pg_conninfo(url)) as conn:
        try:
            conn.execute("SET LOCAL session_replication_role = replica")
        except psycopg.errors.InsufficientPrivilege:
            conn.rollback()
            conn.execute(
                sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(_names(tables(conn)))
            )
            return
        not_empty = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT {} WHERE EXISTS (SELECT 1 FROM {})").format(name, sql.Identifier(name))
            for name in tables(conn)
        )
        for (name,) in conn.execute(not_empty).fetchall():
            conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(name)))
        conn.execute(_RESTART_SEQUENCES)
