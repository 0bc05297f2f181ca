"""a partial index for the last top-up of a user, read after every charge

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 00:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Kept literal here (a migration must not change when the code does); the model's
# TOP_UP_PREDICATE must equal it, which the models-vs-migrations test checks.
PREDICATE = "amount > 0 AND kind IN ('adjustment', 'grant', 'purchase', 'refund')"


def upgrade() -> None:
    op.create_index(
        "ix_ledger_entries_top_ups",
        "ledger_entries",
        ["user_id", "id"],
        postgresql_where=sa.text(PREDICATE),
        sqlite_where=sa.text(PREDICATE),
    )


def downgrade() -> None:
    op.drop_index("ix_ledger_entries_top_ups", table_name="ledger_entries")
