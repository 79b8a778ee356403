"""columnar event store beside the warehouse; events lose their secondary indexes and foreign key

Revision ID: 0005_event_store
Revises: 0004_consent_history
Create Date: 2026-12-02 06:30:00

Features read behaviour events from Parquet parts (one per loaded file, written in the file's
load transaction and listed in ``event_parts``), so the row table keeps only its primary key:
its ``customer_id`` and ``ts`` indexes cost most of a bulk load and no query uses them. The
foreign key to ``customers`` goes too: the data contract checks every batch's customer ids, and
PostgreSQL's per-row foreign-key trigger costs more than the rest of a bulk load.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_event_store"
down_revision = "0004_consent_history"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "event_parts",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("batch", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_event_parts")),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_ts"))
        batch_op.drop_index(batch_op.f("ix_events_customer_id"))
        batch_op.drop_constraint(batch_op.f("fk_events_customer_id_customers"), type_="foreignkey")


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_foreign_key(
            batch_op.f("fk_events_customer_id_customers"), "customers", ["customer_id"], ["customer_id"]
        )
        batch_op.create_index(batch_op.f("ix_events_customer_id"), ["customer_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_events_ts"), ["ts"], unique=False)
    op.drop_table("event_parts")
