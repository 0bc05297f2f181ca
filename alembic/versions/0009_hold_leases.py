"""hold leases: what a hold's call is priced by, how much it has delivered; replies in flight

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("model", sa.String(length=100), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("price_version_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("input_tokens", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("delivered_tokens", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("checkpoint_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_foreign_key(
            "fk_holds_price_version_id_model_prices", "model_prices", ["price_version_id"], ["id"]
        )
    with op.batch_alter_table("chat_messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_chat_messages_streaming",
            ["request_id"],
            unique=False,
            sqlite_where=sa.text("outcome = 'streaming'"),
            postgresql_where=sa.text("outcome = 'streaming'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("chat_messages", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_chat_messages_streaming",
            sqlite_where=sa.text("outcome = 'streaming'"),
            postgresql_where=sa.text("outcome = 'streaming'"),
        )
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_constraint("fk_holds_price_version_id_model_prices", type_="foreignkey")
        batch_op.drop_column("checkpoint_at")
        batch_op.drop_column("delivered_tokens")
        batch_op.drop_column("input_tokens")
        batch_op.drop_column("price_version_id")
        batch_op.drop_column("model")
