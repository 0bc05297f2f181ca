"""thresholds and admin audit

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 23:18:18.010763
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Like the ledger, the audit log is append-only in the database itself.
APPEND_ONLY_SQLITE = [
    """CREATE TRIGGER admin_actions_no_update BEFORE UPDATE ON admin_actions
    BEGIN SELECT RAISE(ABORT, 'admin_actions is append-only'); END""",
    """CREATE TRIGGER admin_actions_no_delete BEFORE DELETE ON admin_actions
    BEGIN SELECT RAISE(ABORT, 'admin_actions is append-only'); END""",
]
APPEND_ONLY_POSTGRES = [
    """CREATE FUNCTION admin_actions_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'admin_actions is append-only'; END $$""",
    """CREATE TRIGGER admin_actions_append_only BEFORE UPDATE OR DELETE ON admin_actions
    FOR EACH ROW EXECUTE FUNCTION admin_actions_append_only()""",
]


def upgrade() -> None:
    op.create_table(
        "admin_actions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("actor_user_id", sa.Integer(), nullable=False),
        sa.Column("actor_email", sa.String(length=320), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("target_user_id", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["actor_user_id"],
            ["users.id"],
        ),
        sa.ForeignKeyConstraint(
            ["target_user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    with op.batch_alter_table("admin_actions", schema=None) as batch_op:
        batch_op.create_index("ix_admin_actions_created_at", ["created_at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_admin_actions_target_user_id"), ["target_user_id"], unique=False
        )

    op.create_table(
        "threshold_crossings",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("allowance_entry_id", sa.BigInteger(), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("allowance", sa.BigInteger(), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=False),
        sa.Column("crossed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dismissed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("emailed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_attempts", sa.Integer(), nullable=False),
        sa.Column("next_email_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_error", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(
            ["allowance_entry_id"],
            ["ledger_entries.id"],
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "user_id", "allowance_entry_id", "threshold", name="uq_threshold_crossings_once"
        ),
    )
    with op.batch_alter_table("threshold_crossings", schema=None) as batch_op:
        batch_op.create_index(
            "ix_threshold_crossings_email_due", ["emailed_at", "next_email_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_threshold_crossings_user_id"), ["user_id"], unique=False
        )
    sqlite = op.get_bind().dialect.name == "sqlite"
    for statement in APPEND_ONLY_SQLITE if sqlite else APPEND_ONLY_POSTGRES:
        op.execute(statement)


def downgrade() -> None:
    with op.batch_alter_table("threshold_crossings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_threshold_crossings_user_id"))
        batch_op.drop_index("ix_threshold_crossings_email_due")

    op.drop_table("threshold_crossings")
    with op.batch_alter_table("admin_actions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_admin_actions_target_user_id"))
        batch_op.drop_index("ix_admin_actions_created_at")

    if op.get_bind().dialect.name != "sqlite":
        op.execute("DROP TRIGGER IF EXISTS admin_actions_append_only ON admin_actions")
        op.execute("DROP FUNCTION IF EXISTS admin_actions_append_only()")
    op.drop_table("admin_actions")
