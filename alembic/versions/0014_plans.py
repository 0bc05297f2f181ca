"""plans: each user's Stripe subscription (as Stripe's events describe it) and the
subscription invoices, with the credits each paid invoice granted

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30 15:55:25.755728
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "invoices",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("invoice_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("subscription_id", sa.String(length=255), nullable=True),
        sa.Column("plan_id", sa.String(length=40), nullable=True),
        sa.Column("billing_reason", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("currency", sa.String(length=8), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("credits_granted", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=True),
        sa.Column("credit_line", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("credit_line_entry_id", sa.BigInteger(), nullable=True),
        sa.Column("overage_credits", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("overage_reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("overage_item_id", sa.String(length=255), nullable=True),
        sa.Column("hosted_invoice_url", sa.String(length=2000), nullable=True),
        sa.Column("invoice_pdf", sa.String(length=2000), nullable=True),
        sa.Column("simulated", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("invoice_id"),
    )
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_invoices_subscription_id"), ["subscription_id"], unique=False
        )
        batch_op.create_index("ix_invoices_user_created", ["user_id", "created_at"], unique=False)

    op.create_table(
        "subscriptions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("subscription_id", sa.String(length=255), nullable=False),
        sa.Column("plan_id", sa.String(length=40), nullable=False),
        sa.Column("price_id", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("current_period_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("current_period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_at_period_end", sa.Boolean(), nullable=False),
        sa.Column("event_created", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("simulated", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("subscription_id"),
    )
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.create_index("ix_subscriptions_user", ["user_id", "updated_at"], unique=False)

    op.create_table(
        "receipt_emails",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("source_id", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("emailed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_attempts", sa.Integer(), nullable=False),
        sa.Column("next_email_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_error", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "source_id", name="uq_receipt_emails_source"),
    )
    with op.batch_alter_table("receipt_emails", schema=None) as batch_op:
        batch_op.create_index(
            "ix_receipt_emails_email_due", ["emailed_at", "next_email_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("receipt_emails", schema=None) as batch_op:
        batch_op.drop_index("ix_receipt_emails_email_due")
    op.drop_table("receipt_emails")
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.drop_index("ix_subscriptions_user")

    op.drop_table("subscriptions")
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_index("ix_invoices_user_created")
        batch_op.drop_index(batch_op.f("ix_invoices_subscription_id"))

    op.drop_table("invoices")
