"""The Postgres tests' reset (tests/dbutil.py): every table empty and the ids from 1 again,
the append-only tables and the tables added since the reset was written included, so no test
sees another's rows."""

from __future__ import annotations

import uuid

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlmodel import SQLModel

from aicredits.adapters.db import Database
from aicredits.adapters.tables import receipt_emails, utcnow
from aicredits.services import admin_actions, users
from aicredits.services.admin_actions import AdminActor
from tests.dbutil import empty_postgres, pg_conninfo, tables
from tests.factories import make_user

pytestmark = pytest.mark.postgres


def counts(url: str) -> dict[str, int]:
    count = sql.SQL("SELECT count(*) FROM {}")
    with psycopg.connect(pg_conninfo(url)) as conn:
        return {
            name: int(row[0])
            for name in tables(conn)
            if (row := conn.execute(count.format(sql.Identifier(name))).fetchone())
        }


def test_the_reset_knows_every_table_of_the_app(pg_url: str) -> None:
    with psycopg.connect(pg_conninfo(pg_url)) as conn:
        assert set(tables(conn)) == set(SQLModel.metadata.tables)


def test_emptying_clears_the_append_only_tables_and_restarts_the_ids(pg_url: str) -> None:
    empty_postgres(pg_url)
    db = Database(pg_url)
    try:
        boss = users.create_user(db, email="boss@example.test")
        user = make_user(db, credits=100)
        admin_actions.adjust_balance(
            db,
            actor=AdminActor(user_id=boss.id, email="boss@example.test"),
            user_id=user,
            credits=-40,
            reason="a test",
            form_token=uuid.uuid4().hex,
        )
        with db.transaction() as conn:  # a table a hand-kept list of tables had missed
            conn.execute(
                receipt_emails.insert().values(
                    user_id=user, kind="purchase", source_id="cs_test", created_at=utcnow()
                )
            )
        written = counts(pg_url)
        assert written["ledger_entries"] >= 2 and written["admin_actions"] == 1
        assert written["receipt_emails"] == 1
        assert boss.id == 1

        empty_postgres(pg_url)

        assert set(counts(pg_url).values()) == {0}
        assert users.create_user(db, email="again@example.test").id == 1
    finally:
        db.dispose()
        empty_postgres(pg_url)


def test_a_role_that_may_not_turn_the_triggers_off_empties_with_truncate(pg_url: str) -> None:
    """AICREDITS_TEST_PG_URL may name a role that is no superuser; it owns what it migrated."""
    name = f"plain_{uuid.uuid4().hex[:8]}"
    role = sql.Identifier(name)
    admin = pg_conninfo(pg_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
        for table in tables(conn):
            conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.Identifier(table), role))
    try:
        db = Database(pg_url)
        try:
            make_user(db, credits=5)
        finally:
            db.dispose()
        as_role = sa.make_url(pg_url).set(username=name).render_as_string(False)
        empty_postgres(as_role)
        assert set(counts(pg_url).values()) == {0}
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(role))
            conn.execute(sql.SQL("DROP ROLE {}").format(role))
