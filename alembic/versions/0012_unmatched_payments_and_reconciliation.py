"""unmatched payments and reconciliation runs: payments the app could not match to a
session it created, and each reconciliation against Stripe

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "unmatched_payments",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("checkout_session_id", sa.String(length=255), nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(length=8), nullable=True),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("detail", sa.String(length=500), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cleared_by", sa.String(length=200), nullable=True),
        sa.Column("clear_note", sa.String(length=500), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("checkout_session_id"),
    )
    with op.batch_alter_table("unmatched_payments", schema=None) as batch_op:
        batch_op.create_index(
            "ix_unmatched_payments_open", ["cleared_at", "created_at"], unique=False
        )
    op.create_table(
        "reconciliation_runs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("trigger", sa.String(length=20), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("fix", sa.Boolean(), nullable=False),
        sa.Column("stripe_checked", sa.Boolean(), nullable=False),
        sa.Column("sessions_checked", sa.Integer(), nullable=False),
        sa.Column("refunds_checked", sa.Integer(), nullable=False),
        sa.Column("discrepancies", sa.Integer(), nullable=False),
        sa.Column("fixed", sa.Integer(), nullable=False),
        sa.Column("report", sa.Text(), server_default="[]", nullable=False),
        sa.Column("error", sa.String(length=500), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("reconciliation_runs", schema=None) as batch_op:
        batch_op.create_index("ix_reconciliation_runs_started_at", ["started_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("reconciliation_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_reconciliation_runs_started_at")
    op.drop_table("reconciliation_runs")
    with op.batch_alter_table("unmatched_payments", schema=None) as batch_op:
        batch_op.drop_index("ix_unmatched_payments_open")
    op.drop_table("unmatched_payments")
