"""landing-zone drops handled exactly once

Revision ID: 0003_landed_batches
Revises: 0002_contacts
Create Date: 2026-12-02 03:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_landed_batches"
down_revision = "0002_contacts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "landed_batches",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("drop_id", sa.String(length=256), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("exported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.CheckConstraint("kind IN ('batches', 'feedback')", name=op.f("ck_landed_batches_kind_known")),
        sa.CheckConstraint(
            "status IN ('loaded', 'quarantined')", name=op.f("ck_landed_batches_status_known")
        ),
        sa.PrimaryKeyConstraint("kind", "drop_id", name=op.f("pk_landed_batches")),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("landed_batches")
