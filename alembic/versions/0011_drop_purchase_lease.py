"""drop the purchase lease: refund settlement holds the purchase's row in its own transaction

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE on both databases (SQLite has DROP COLUMN since 3.35), not a batch copy:
# copying purchases would drop the table that account_flags rows refer to.


def upgrade() -> None:
    op.drop_column("purchases", "lease_until")
    op.drop_column("purchases", "lease_token")


def downgrade() -> None:
    op.add_column("purchases", sa.Column("lease_token", sa.String(length=64), nullable=True))
    op.add_column("purchases", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
