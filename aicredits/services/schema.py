"""The database schema brought to the code's version: what `python -m aicredits migrate` and a
production start both do before anything else."""

from __future__ import annotations

from aicredits.adapters.db import Database
from aicredits.adapters.migrations import upgrade_to_head
from aicredits.services import pricing
from aicredits.settings import Settings


def migrate(db: Database, settings: Settings) -> list[str]:
    """Apply the migrations, then price the configured models that have no price yet.
    Returns what was done, a line each, for the operator."""
    upgrade_to_head(db.url)
    seeded = pricing.seed_prices(db, settings.priced_models)
    return [f"database at head ({db.dialect})"] + [
        f"priced {price.model}: {price.input_per_mtok} in / {price.output_per_mtok} out "
        "credits per 1M tokens"
        for price in seeded
    ]
