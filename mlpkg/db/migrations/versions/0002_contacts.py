"""Customer contact details, and skipped deliveries.

Revision ID: 0002_contacts
Revises: 0001
Create Date: 2026-12-02 02:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_contacts"
down_revision = "0001"
branch_labels = None
depends_on = None

_STATUSES_BEFORE = "status IN ('pending', 'sending', 'sent', 'failed', 'bounced')"
_STATUSES_AFTER = "status IN ('pending', 'sending', 'sent', 'failed', 'bounced', 'skipped')"


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "contacts",
        sa.Column("customer_id", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("push_token", sa.String(length=512), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.customer_id"], name=op.f("fk_contacts_customer_id_customers")
        ),
        sa.PrimaryKeyConstraint("customer_id", name=op.f("pk_contacts")),
    )
    # A skipped delivery (no contact for its channel) has no recipient and its reason in last_error.
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.alter_column("recipient", existing_type=sa.String(length=256), nullable=True)
        batch_op.drop_constraint(batch_op.f("ck_deliveries_status_known"), type_="check")
        batch_op.create_check_constraint(batch_op.f("ck_deliveries_status_known"), _STATUSES_AFTER)


def downgrade() -> None:
    """Revert this revision."""
    # Skipped rows cannot be expressed in the old schema (no recipient, unknown status).
    op.execute("DELETE FROM deliveries WHERE status = 'skipped'")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("ck_deliveries_status_known"), type_="check")
        batch_op.create_check_constraint(batch_op.f("ck_deliveries_status_known"), _STATUSES_BEFORE)
        batch_op.alter_column("recipient", existing_type=sa.String(length=256), nullable=False)
    op.drop_table("contacts")
