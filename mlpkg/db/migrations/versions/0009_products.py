"""products: the shop's catalogue, product ids on events and orders, recommendations per campaign

Revision ID: 0009_products
Revises: 0008_reasons
Create Date: 2026-12-04 09:00:00

``products`` holds the catalogue (``products.csv``); ``events.product_id`` and
``orders.product_id`` are nullable so rows loaded before (and exports without the column) stay
valid. ``recommendations`` holds each campaign's ranked products per customer (pseudonyms).
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_products"
down_revision = "0008_reasons"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "products",
        sa.Column("product_id", sa.String(length=64), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("price", sa.Float(), nullable=False),
        sa.Column("in_stock", sa.Boolean(), nullable=False),
        sa.CheckConstraint("price >= 0", name=op.f("ck_products_price_nonneg")),
        sa.PrimaryKeyConstraint("product_id", name=op.f("pk_products")),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("product_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("product_id", sa.String(length=64), nullable=True))
    op.create_table(
        "recommendations",
        sa.Column("campaign_id", sa.String(length=128), nullable=False),
        sa.Column("customer_id", sa.String(length=64), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.String(length=64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaigns.campaign_id"],
            name=op.f("fk_recommendations_campaign_id_campaigns"),
        ),
        sa.PrimaryKeyConstraint("campaign_id", "customer_id", "rank", name=op.f("pk_recommendations")),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("recommendations")
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.drop_column("product_id")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("product_id")
    op.drop_table("products")
