"""Completion that learns the sender: series.open_associations / continued, sender_history.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the association bookkeeping of a series and the per-sender history table."""
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("open_associations", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("continued", sa.Integer(), server_default="0", nullable=False))
    op.create_table(
        "sender_history",
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
        sa.Column("rule", sa.String(length=128), nullable=False),
        sa.Column("split", sa.Integer(), nullable=False),
        sa.Column("premature", sa.Integer(), nullable=False),
        sa.Column("completion_reason", sa.String(length=32), nullable=False),
        sa.Column("completed_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("series_instance_uid"),
    )
    op.create_index("ix_sender_history_sender", "sender_history",
                    ["calling_ae_title", "rule", "completed_at"], unique=False)


def downgrade() -> None:
    """Drop them again."""
    op.drop_index("ix_sender_history_sender", table_name="sender_history")
    op.drop_table("sender_history")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("continued")
        batch_op.drop_column("open_associations")
