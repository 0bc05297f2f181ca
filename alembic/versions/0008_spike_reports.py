"""spike reports: each user whose spending spiked, reported once per clock hour

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 23:58:44.282070
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "spike_reports",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_hour", sa.BigInteger(), nullable=False),
        sa.Column("previous_week", sa.BigInteger(), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("emailed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_attempts", sa.Integer(), nullable=False),
        sa.Column("next_email_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_error", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "hour", name="uq_spike_reports_once"),
    )
    with op.batch_alter_table("spike_reports", schema=None) as batch_op:
        batch_op.create_index(
            "ix_spike_reports_email_due", ["emailed_at", "next_email_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_spike_reports_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("spike_reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_spike_reports_user_id"))
        batch_op.drop_index("ix_spike_reports_email_due")

    op.drop_table("spike_reports")
