"""privacy: the shop's customer id only in contacts, no address on deliveries, the privacy audit

Revision ID: 0007_privacy
Revises: 0006_events_without_rowid
Create Date: 2026-12-03 06:40:00

From this revision on, ingest stores a keyed pseudonym wherever a customer id goes and keeps the
shop's id in ``contacts.external_id`` only (see :mod:`mlpkg.privacy`); rows loaded before it keep
the ids they had (load the shop's exports into a fresh warehouse to pseudonymise them). Delivery
reads a recipient's address from ``contacts`` at send time, so ``deliveries.recipient`` goes.
``privacy_audit`` records forgotten customers (by pseudonym) and retention purges.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_privacy"
down_revision = "0006_events_without_rowid"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("external_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("recipient")
    op.create_table(
        "privacy_audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=True),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("action IN ('forget', 'purge')", name=op.f("ck_privacy_audit_action_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_audit")),
    )
    with op.batch_alter_table("privacy_audit", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_privacy_audit_pseudonym"), ["pseudonym"], unique=False)


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("privacy_audit", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_privacy_audit_pseudonym"))
    op.drop_table("privacy_audit")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recipient", sa.String(length=256), nullable=True))
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.drop_column("external_id")
