"""storage commitment transactions

Revision ID: 0009_commitment
Revises: 0008_admin
Create Date: 2026-12-06 21:40:00

One row per Storage Commitment transaction (``[[destinations]] commitment =
"storage-commitment"``): which objects it asks the archive to commit, how many N-ACTIONs were
sent, and the archive's N-EVENT-REPORT once it came.  It is written in the same transaction as
the delivery it proves, before the N-ACTION goes out, so a node killed between the request and
the report finds it at restart: a report arriving later is still applied, and a request without
one is sent again.  Self-contained: it only adds its table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_commitment"
down_revision = "0008_admin"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the ``commitments`` table."""
    op.create_table(
        "commitments",
        sa.Column("transaction_uid", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("objects_json", sa.Text(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=False),
        sa.Column("requested_at", sa.Float(), nullable=False),
        sa.Column("report_json", sa.Text(), nullable=True),
        sa.Column("reported_at", sa.Float(), nullable=True),
        sa.Column("closed_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("transaction_uid"),
    )
    op.create_index("ix_commitments_state", "commitments", ["state"], unique=False)
    op.create_index("ix_commitments_job_id", "commitments", ["job_id"], unique=False)


def downgrade() -> None:
    """Drop it again."""
    op.drop_index("ix_commitments_job_id", table_name="commitments")
    op.drop_index("ix_commitments_state", table_name="commitments")
    op.drop_table("commitments")
