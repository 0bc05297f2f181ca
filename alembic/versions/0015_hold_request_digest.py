"""holds: a keyed call's request digest, so a replay of an Idempotency-Key with another
request is told apart from a retry of the same one

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01 03:22:27.055175
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable with no default: on Postgres the column is added without rewriting the table.
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_digest", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_column("request_digest")
