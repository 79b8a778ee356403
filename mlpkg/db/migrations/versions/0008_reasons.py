"""reasons: why every ledger row got its arm or none (attributions, runner-up, binding constraint)

Revision ID: 0008_reasons
Revises: 0007_privacy
Create Date: 2026-12-04 09:00:00

One ``allocation_reasons`` row per ``allocations`` row, written in the ledger's transaction (see
:mod:`mlpkg.allocation.reasons`). Campaigns allocated before this revision have none.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_reasons"
down_revision = "0007_privacy"
branch_labels = None
depends_on = None

_CODES = (
    "model_choice", "exploration_draw", "control_group", "cooldown", "consent", "not_eligible",
    "budget", "inventory", "capacity", "fairness", "no_gain", "repair", "cold_start",
)


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "allocation_reasons",
        sa.Column("campaign_id", sa.String(length=128), nullable=False),
        sa.Column("customer_id", sa.String(length=64), nullable=False),
        sa.Column("binding", sa.String(length=32), nullable=False),
        sa.Column("explained_arm", sa.String(length=128), nullable=True),
        sa.Column("runner_up", sa.String(length=128), nullable=True),
        sa.Column("margin", sa.Float(), nullable=True),
        sa.Column("uplift", sa.Float(), nullable=True),
        sa.Column("method", sa.String(length=32), nullable=True),
        sa.Column("constraints", sa.JSON(), nullable=False),
        sa.Column("attributions", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "binding IN (" + ", ".join(f"'{c}'" for c in _CODES) + ")",
            name=op.f("ck_allocation_reasons_binding_known"),
        ),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.campaign_id"], name=op.f("fk_allocation_reasons_campaign_id_campaigns")
        ),
        sa.PrimaryKeyConstraint("campaign_id", "customer_id", name=op.f("pk_allocation_reasons")),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("allocation_reasons")
