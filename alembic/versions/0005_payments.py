"""payments

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 22:53:32.382061
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("payment_intent_id", sa.String(length=255), nullable=True),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    with op.batch_alter_table("stripe_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_stripe_events_payment_intent_id"), ["payment_intent_id"], unique=False
        )

    op.create_table(
        "purchases",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("pack_id", sa.String(length=40), nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("checkout_session_id", sa.String(length=255), nullable=False),
        sa.Column("payment_intent_id", sa.String(length=255), nullable=True),
        sa.Column("charge_id", sa.String(length=255), nullable=True),
        sa.Column("customer_id", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("credits_granted", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("amount_refunded", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("credits_clawed_back", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("credits_shortfall", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("receipt_url", sa.String(length=2000), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("simulated", sa.Boolean(), nullable=False),
        sa.Column("lease_token", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fulfilled_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('open', 'pending', 'paid', 'failed', 'expired')", name="ck_purchases_status"
        ),
        sa.CheckConstraint("amount >= 0", name="ck_purchases_amount_non_negative"),
        sa.CheckConstraint(
            "amount_refunded >= 0 AND credits_granted >= 0 AND credits_clawed_back >= 0 AND credits_shortfall >= 0",
            name="ck_purchases_counters_non_negative",
        ),
        sa.CheckConstraint("credits > 0", name="ck_purchases_credits_positive"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("checkout_session_id"),
    )
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_purchases_charge_id"), ["charge_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_purchases_payment_intent_id"), ["payment_intent_id"], unique=False
        )
        batch_op.create_index("ix_purchases_user_created", ["user_id", "created_at"], unique=False)

    op.create_table(
        "stripe_customers",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("user_id"),
        sa.UniqueConstraint("customer_id"),
    )
    op.create_table(
        "account_flags",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("purchase_id", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.String(length=500), nullable=False),
        sa.Column("amount", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cleared_by", sa.String(length=200), nullable=True),
        sa.Column("clear_note", sa.String(length=500), nullable=True),
        sa.CheckConstraint("kind IN ('refund_shortfall', 'dispute')", name="ck_account_flags_kind"),
        sa.ForeignKeyConstraint(
            ["purchase_id"],
            ["purchases.id"],
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    with op.batch_alter_table("account_flags", schema=None) as batch_op:
        batch_op.create_index("ix_account_flags_open", ["cleared_at", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_account_flags_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("account_flags", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_account_flags_user_id"))
        batch_op.drop_index("ix_account_flags_open")

    op.drop_table("account_flags")
    op.drop_table("stripe_customers")
    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.drop_index("ix_purchases_user_created")
        batch_op.drop_index(batch_op.f("ix_purchases_payment_intent_id"))
        batch_op.drop_index(batch_op.f("ix_purchases_charge_id"))

    op.drop_table("purchases")
    with op.batch_alter_table("stripe_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stripe_events_payment_intent_id"))

    op.drop_table("stripe_events")
