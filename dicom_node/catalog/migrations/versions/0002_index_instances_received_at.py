"""Index instances.received_at (the dashboard and retention query instances by arrival time).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``ix_instances_received_at``."""
    op.create_index(op.f("ix_instances_received_at"), "instances", ["received_at"], unique=False)


def downgrade() -> None:
    """Drop ``ix_instances_received_at``."""
    op.drop_index(op.f("ix_instances_received_at"), table_name="instances")
