"""job ids never reused (SQLite AUTOINCREMENT)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 19:30:00

Without ``AUTOINCREMENT`` SQLite gives a new row ``max(id) + 1``: once ``gc`` removed every job,
the next job got id 1 again, and "job 1" in an old log line or ticket named another study.  The
jobs table is rebuilt with ``AUTOINCREMENT`` (SQLite then keeps the highest id ever used in
``sqlite_sequence``).  PostgreSQL's ``SERIAL`` sequence never goes back: nothing to do there.
"""

from __future__ import annotations

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    if op.get_context().dialect.name != "sqlite":
        return
    # job_events and deliveries reference jobs.id: the copy-drop-rename of the rebuild must not
    # be checked row by row (the rows match again once the new table has its name).  The pragma
    # lasts until this transaction commits.
    op.execute("PRAGMA defer_foreign_keys = ON")
    with op.batch_alter_table('jobs', recreate="always", table_kwargs={"sqlite_autoincrement": True}):
        pass


def downgrade() -> None:
    """Undo this revision."""
    if op.get_context().dialect.name != "sqlite":
        return
    op.execute("PRAGMA defer_foreign_keys = ON")
    with op.batch_alter_table('jobs', recreate="always", table_kwargs={"sqlite_autoincrement": False}):
        pass
