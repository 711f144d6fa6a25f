"""study date, next delivery attempt, destination findings

Revision ID: 0008_admin
Revises: 0007
Create Date: 2026-12-06 21:40:00

Three things an operator asked for on the dashboard (issue 22, items 4 and 9):

* ``series.study_date``: the StudyDate (DA, ``YYYYMMDD``) of the series' first instance, so jobs
  and series are named by something a person recognises.  It is not one of the identifying
  attributes the node never keeps (patient name, ID, birth date).  Series recorded before this
  revision have none.
* ``deliveries.next_attempt_at``: when a delivery that failed transiently is tried again (the
  countdown of the worker's retry), shown as "next attempt at"; NULL when none is scheduled.
* ``destination_findings``: what the node learned about a destination once, e.g. an archive
  that keeps the first object with a SOP Instance UID and ignores a corrected re-run (written
  by the worker, read by ``serve``'s dashboard, ``/readyz`` and ``/metrics`` in another process).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008_admin'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('series') as batch_op:
        batch_op.add_column(sa.Column('study_date', sa.String(length=8), nullable=True))
    with op.batch_alter_table('deliveries') as batch_op:
        batch_op.add_column(sa.Column('next_attempt_at', sa.Float(), nullable=True))
    op.create_table(
        'destination_findings',
        sa.Column('destination', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=64), nullable=False),
        sa.Column('detail', sa.Text(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('found_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('destination', 'kind'),
    )


def downgrade() -> None:
    """Undo this revision."""
    op.drop_table('destination_findings')
    with op.batch_alter_table('deliveries') as batch_op:
        batch_op.drop_column('next_attempt_at')
    with op.batch_alter_table('series') as batch_op:
        batch_op.drop_column('study_date')
