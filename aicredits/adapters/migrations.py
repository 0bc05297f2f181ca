"""Alembic, driven from code: the CLI, the app's start-up and the tests all migrate this way."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.pool import NullPool

from aicredits.adapters.db import with_connection_defaults

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def alembic_config(database_url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


# Postgres advisory lock key held while migrating ("aicr" in ASCII).
MIGRATION_LOCK_KEY = 0x61696372


def upgrade_to_head(database_url: str) -> None:
    """Apply every migration. On Postgres, under an advisory lock: several workers or
    containers starting at once migrate one after the other (the later ones find nothing to
    do) instead of racing to create the same tables."""
    if not database_url.startswith("postgresql"):
        command.upgrade(alembic_config(database_url), "head")
        return
    engine = sa.create_engine(with_connection_defaults(database_url), poolclass=NullPool)
    try:
        with engine.connect() as lock:
            lock.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            lock.commit()
            try:
                command.upgrade(alembic_config(database_url), "head")
            finally:
                lock.execute(
                    sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
                lock.commit()
    finally:
        engine.dispose()
