"""per-object delivery outcomes

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 19:40:00

The outcome of each result object of a delivery (sent, refused at negotiation, confirmed or
unconfirmed by a C-FIND) as one nullable JSON column on ``deliveries``.  Deliveries recorded
before this revision have none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('deliveries') as batch_op:
        batch_op.add_column(sa.Column('objects_json', sa.Text(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('deliveries') as batch_op:
        batch_op.drop_column('objects_json')
