"""warm models per worker process

Revision ID: 0010_gpu
Revises: 0009_commitment
Create Date: 2026-12-06 21:45:00

Each worker process reports the models it holds in memory (name, version, device, loaded and
last used times) with its heartbeat, as one nullable JSON column on ``worker_heartbeats``, so
``/api/models`` and the dashboard can say which models are warm on which worker.  Rows written
before this revision (and the Celery main processes, which hold no model) have none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010_gpu'
down_revision = '0009_commitment'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('worker_heartbeats') as batch_op:
        batch_op.add_column(sa.Column('warm_models_json', sa.Text(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('worker_heartbeats') as batch_op:
        batch_op.drop_column('warm_models_json')
