"""trial addresses: free trials given and refused per client address per day; users
created past the limit are marked, never to get the trial

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 11:58:37.159778
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "trial_addresses",
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("granted", sa.Integer(), nullable=False),
        sa.Column("refused", sa.Integer(), nullable=False),
        sa.CheckConstraint("granted >= 0", name="ck_trial_addresses_granted_non_negative"),
        sa.CheckConstraint("refused >= 0", name="ck_trial_addresses_refused_non_negative"),
        sa.PrimaryKeyConstraint("address", "day"),
    )
    with op.batch_alter_table("trial_addresses", schema=None) as batch_op:
        batch_op.create_index("ix_trial_addresses_day", ["day"], unique=False)

    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("trial_withheld_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("trial_withheld_others", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("trial_withheld_others")
        batch_op.drop_column("trial_withheld_at")

    with op.batch_alter_table("trial_addresses", schema=None) as batch_op:
        batch_op.drop_index("ix_trial_addresses_day")

    op.drop_table("trial_addresses")
