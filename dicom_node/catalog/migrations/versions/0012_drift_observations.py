"""drift observations and scanners

Revision ID: 0012_drift
Revises: 0011_shadow
Create Date: 2026-12-06 21:40:00

Two new tables for the drift monitor (``dicom_node.drift``): ``drift_scanners`` (the bounded set of
scanners tracked, plus one ``other`` row) and ``drift_observations`` (one row of input and output
features per (model, series)).  Nothing existing changes, so this revision is self-contained.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012_drift'
down_revision = '0011_shadow'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        'drift_scanners',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('label', sa.String(length=40), nullable=False),
        sa.Column('manufacturer', sa.String(length=64), nullable=False),
        sa.Column('model_name', sa.String(length=64), nullable=False),
        sa.Column('station', sa.String(length=16), nullable=False),
        sa.Column('protocol', sa.String(length=64), nullable=False),
        sa.Column('first_seen', sa.Float(), nullable=False),
        sa.Column('last_seen', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('key'),
    )
    op.create_table(
        'drift_observations',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('model', sa.String(length=128), nullable=False),
        sa.Column('scanner_id', sa.Integer(), nullable=False),
        sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('at', sa.Float(), nullable=False),
        sa.Column('features_json', sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(['scanner_id'], ['drift_scanners.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('model', 'series_instance_uid', name='uq_drift_model_series'),
    )
    op.create_index('ix_drift_pair', 'drift_observations', ['model', 'scanner_id', 'id'])
    op.create_index(op.f('ix_drift_observations_at'), 'drift_observations', ['at'])


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index(op.f('ix_drift_observations_at'), table_name='drift_observations')
    op.drop_index('ix_drift_pair', table_name='drift_observations')
    op.drop_table('drift_observations')
    op.drop_table('drift_scanners')
