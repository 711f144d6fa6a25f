"""Shadow mode: jobs.mode, shadow_comparisons, rule_modes, rule_mode_events.

Revision ID: 0011_shadow
Revises: 0010_gpu
Create Date: 2026-12-06 21:45:00

A rule with ``mode = "shadow"`` runs its models on live traffic and keeps the results in the
node: its jobs carry ``mode = "shadow"`` (every existing job is live).  The agreement of a
shadow job with the live jobs of the same series is stored once both are done; ``rule_modes``
remembers each rule's mode so that a promotion (shadow -> live) at the next start is recorded
in ``rule_mode_events``.  No foreign keys to ``jobs``: the comparisons outlive ``gc``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_shadow"
down_revision = "0010_gpu"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the job mode and the shadow tables."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mode", sa.String(length=8), server_default="live", nullable=False))
    op.create_table(
        "shadow_comparisons",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("shadow_job_id", sa.Integer(), nullable=False),
        sa.Column("live_job_id", sa.Integer(), nullable=False),
        sa.Column("shadow_model", sa.String(length=128), nullable=False),
        sa.Column("live_model", sa.String(length=128), nullable=False),
        sa.Column("computed_at", sa.Float(), nullable=False),
        sa.Column("dice", sa.Float(), nullable=True),
        sa.Column("basis", sa.String(length=32), nullable=False),
        sa.Column("shadow_findings", sa.Integer(), nullable=False),
        sa.Column("live_findings", sa.Integer(), nullable=False),
        sa.Column("matched_findings", sa.Integer(), nullable=False),
        sa.Column("detail_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("shadow_job_id", "live_job_id", name="uq_shadow_comparison_jobs"),
    )
    op.create_index("ix_shadow_comparisons_series_instance_uid", "shadow_comparisons",
                    ["series_instance_uid"], unique=False)
    op.create_index("ix_shadow_comparisons_models", "shadow_comparisons",
                    ["shadow_model", "live_model", "computed_at"], unique=False)
    op.create_table(
        "rule_modes",
        sa.Column("rule", sa.String(length=128), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("rule"),
    )
    op.create_table(
        "rule_mode_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("rule", sa.String(length=128), nullable=False),
        sa.Column("old_mode", sa.String(length=8), nullable=False),
        sa.Column("new_mode", sa.String(length=8), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rule_mode_events_at", "rule_mode_events", ["at"], unique=False)


def downgrade() -> None:
    """Drop them again."""
    op.drop_index("ix_rule_mode_events_at", table_name="rule_mode_events")
    op.drop_table("rule_mode_events")
    op.drop_table("rule_modes")
    op.drop_index("ix_shadow_comparisons_models", table_name="shadow_comparisons")
    op.drop_index("ix_shadow_comparisons_series_instance_uid", table_name="shadow_comparisons")
    op.drop_table("shadow_comparisons")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("mode")
