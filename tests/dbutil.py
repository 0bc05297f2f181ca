"""Helpers for the real Postgres used by the tests."""

from __future__ import annotations

import os

import psycopg
import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get(
    "AICREDITS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TABLES = [
    "unmatched_payments",
    "reconciliation_runs",
    "trial_addresses",
    "spike_reports",
    "admin_actions",
    "threshold_crossings",
    "account_flags",
    "stripe_events",
    "stripe_customers",
    "purchases",
    "chat_messages",
    "conversations",
    "api_keys",
    "login_attempts",
    "auth_sessions",
    "identities",
    "usage_events",
    "credit_lots",
    "ledger_entries",
    "holds",
    "credit_accounts",
    "model_prices",
    "users",
]


def pg_conninfo(url: str, dbname: str | None = None) -> str:
    """A libpq URL (no SQLAlchemy driver suffix), optionally for another database."""
    parsed = sa.make_url(url.replace("postgresql+psycopg://", "postgresql://"))
    if dbname:
        parsed = parsed.set(database=dbname)
    return parsed.render_as_string(hide_password=False)


def truncate_postgres(url: str) -> None:
    """Empty every table; TRUNCATE does not fire the ledger's row-level append-only trigger."""
    with psycopg.connect(pg_conninfo(url), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
