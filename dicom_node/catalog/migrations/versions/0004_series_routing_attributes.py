"""series routing attributes

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 19:20:00

The routing attributes of a series (``dicom_node.attributes.ROUTING_KEYWORDS``) as one JSON
column, so a new match key needs no column and no migration of its own.  Series recorded before
this revision have none: they keep routing on their columns.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('series') as batch_op:
        batch_op.add_column(sa.Column('routing_json', sa.Text(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('series') as batch_op:
        batch_op.drop_column('routing_json')
