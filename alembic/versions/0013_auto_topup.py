"""auto top-up: saved cards, settings and one row per top-up

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30 15:27:12.371000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "auto_topup_settings",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("threshold", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pack_id", sa.String(length=40), nullable=False),
        sa.Column("monthly_cap", sa.Integer(), nullable=False),
        sa.Column("payment_method_id", sa.String(length=255), nullable=True),
        sa.Column("customer_id", sa.String(length=255), nullable=True),
        sa.Column("card_brand", sa.String(length=20), nullable=False),
        sa.Column("card_last4", sa.String(length=4), nullable=False),
        sa.Column("card_exp", sa.String(length=7), nullable=False),
        sa.Column("card_simulated", sa.Boolean(), nullable=False),
        sa.Column("setup_session_id", sa.String(length=255), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("retry_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notice_kind", sa.String(length=20), nullable=False),
        sa.Column("notice", sa.String(length=500), nullable=False),
        sa.Column("simulate_next", sa.String(length=32), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("monthly_cap >= 0", name="ck_auto_topup_settings_monthly_cap"),
        sa.CheckConstraint("threshold >= 0", name="ck_auto_topup_settings_threshold"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("user_id"),
        sa.UniqueConstraint("setup_session_id"),
    )
    with op.batch_alter_table("auto_topup_settings", schema=None) as batch_op:
        batch_op.create_index("ix_auto_topup_settings_enabled", ["enabled"], unique=False)

    op.create_table(
        "auto_topups",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("purchase_id", sa.BigInteger(), nullable=False),
        sa.Column("pack_id", sa.String(length=40), nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("payment_intent_id", sa.String(length=255), nullable=True),
        sa.Column("failure_code", sa.String(length=64), nullable=False),
        sa.Column("failure_message", sa.String(length=500), nullable=False),
        sa.Column("simulated", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("emailed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_attempts", sa.Integer(), nullable=False),
        sa.Column("next_email_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_error", sa.String(length=500), nullable=False),
        sa.CheckConstraint(
            "status IN ('processing', 'succeeded', 'failed', 'requires_action')",
            name="ck_auto_topups_status",
        ),
        sa.CheckConstraint("credits > 0", name="ck_auto_topups_credits_positive"),
        sa.ForeignKeyConstraint(
            ["purchase_id"],
            ["purchases.id"],
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
        sa.UniqueConstraint("payment_intent_id"),
    )
    with op.batch_alter_table("auto_topups", schema=None) as batch_op:
        batch_op.create_index(
            "ix_auto_topups_email_due", ["emailed_at", "next_email_at"], unique=False
        )
        batch_op.create_index(
            "ix_auto_topups_user_created", ["user_id", "created_at"], unique=False
        )
        batch_op.create_index(
            "uq_auto_topups_in_flight",
            ["user_id"],
            unique=True,
            sqlite_where=sa.text("status = 'processing'"),
            postgresql_where=sa.text("status = 'processing'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("auto_topups", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_auto_topups_in_flight",
            sqlite_where=sa.text("status = 'processing'"),
            postgresql_where=sa.text("status = 'processing'"),
        )
        batch_op.drop_index("ix_auto_topups_user_created")
        batch_op.drop_index("ix_auto_topups_email_due")

    op.drop_table("auto_topups")
    with op.batch_alter_table("auto_topup_settings", schema=None) as batch_op:
        batch_op.drop_index("ix_auto_topup_settings_enabled")

    op.drop_table("auto_topup_settings")
