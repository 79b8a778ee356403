"""consent becomes a history keyed by (customer, channel, updated_at).

Revision ID: 0004_consent_history
Revises: 0003_landed_batches
Create Date: 2026-12-03 01:00:00

Each existing row (one per customer and channel) becomes that pair's first event, so the state
as of any time after it is what it was before the upgrade.
"""

from alembic import op

revision = "0004_consent_history"
down_revision = "0003_landed_batches"
branch_labels = None
depends_on = None

# Drops every event that a later one of the same (customer, channel) supersedes; what is left is
# the current state, one row per pair (the history's key forbids two events at the same instant).
_KEEP_LATEST = """
DELETE FROM consent
WHERE EXISTS (
    SELECT 1 FROM consent AS newer
    WHERE newer.customer_id = consent.customer_id
      AND newer.channel = consent.channel
      AND newer.updated_at > consent.updated_at
)
"""


def upgrade() -> None:
    """Apply this revision."""
    # Batch mode recreates the table on SQLite (which cannot alter a primary key) and issues
    # plain ALTER TABLE statements on PostgreSQL; the rows are copied as they are.
    with op.batch_alter_table("consent", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("pk_consent"), type_="primary")
        batch_op.create_primary_key(batch_op.f("pk_consent"), ["customer_id", "channel", "updated_at"])


def downgrade() -> None:
    """Revert this revision, keeping only each (customer, channel)'s latest event."""
    op.execute(_KEEP_LATEST)
    with op.batch_alter_table("consent", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("pk_consent"), type_="primary")
        batch_op.create_primary_key(batch_op.f("pk_consent"), ["customer_id", "channel"])
