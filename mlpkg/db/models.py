"""Typed SQLAlchemy 2 models of the CouponOps warehouse.

Every table has a natural key so loads are upserts and re-runs are harmless. Money and
inventory limits are enforced by CHECK constraints, so no writer (concurrent or not) can
overspend a campaign budget or over-issue a coupon.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base with a naming convention so Alembic names constraints predictably."""

    from sqlalchemy import MetaData

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


TS = DateTime(timezone=True)


class Customer(Base):
    """A shop customer (observable attributes only)."""

    __tablename__ = "customers"
    customer_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    signup_date: Mapped[date] = mapped_column(Date)
    region: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(32))
    segment: Mapped[str] = mapped_column(String(32))


class Channel(Base):
    """A delivery channel with its per-message cost and daily capacity."""

    __tablename__ = "channels"
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    send_cost: Mapped[float] = mapped_column(Float)
    daily_capacity: Mapped[int] = mapped_column(Integer)
    __table_args__ = (
        CheckConstraint("send_cost >= 0", name="send_cost_nonneg"),
        CheckConstraint("daily_capacity >= 0", name="capacity_nonneg"),
    )


class Coupon(Base):
    """A coupon in the catalogue; ``issued`` can never exceed ``inventory``."""

    __tablename__ = "coupons"
    coupon_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    face_value: Mapped[float] = mapped_column(Float)
    min_basket: Mapped[float] = mapped_column(Float)
    inventory: Mapped[int] = mapped_column(Integer)
    issued: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    valid_from: Mapped[datetime] = mapped_column(TS)
    valid_to: Mapped[datetime] = mapped_column(TS)
    __table_args__ = (
        CheckConstraint("face_value > 0", name="face_value_pos"),
        CheckConstraint("min_basket >= 0", name="min_basket_nonneg"),
        CheckConstraint("issued >= 0 AND issued <= inventory", name="issued_within_inventory"),
    )


class Product(Base):
    """A product of the shop's catalogue (a snapshot: the newer price and stock replace the older)."""

    __tablename__ = "products"
    product_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    category: Mapped[str] = mapped_column(String(64))
    price: Mapped[float] = mapped_column(Float)
    in_stock: Mapped[bool] = mapped_column(Boolean)
    __table_args__ = (CheckConstraint("price >= 0", name="price_nonneg"),)


class Consent(Base):
    """One marketing-consent event: a customer opted in to, or out of, one channel at ``updated_at``.

    The table is a history, keyed by (customer, channel, updated_at): the state at a time is the
    latest event at or before it, whatever order the events arrived in (see
    :func:`mlpkg.db.queries.consent_as_of`). Two events for the same key and instant that disagree
    are stored as one opt-out: nobody is messaged on a contradictory record, whichever came first.
    """

    __tablename__ = "consent"
    customer_id: Mapped[str] = mapped_column(ForeignKey("customers.customer_id"), primary_key=True)
    channel: Mapped[str] = mapped_column(ForeignKey("channels.channel"), primary_key=True)
    opted_in: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(TS, primary_key=True)


class Contact(Base):
    """Where one customer can be reached: email address, phone number, push token (each optional).

    Contact details are personal data, kept apart from features: only delivery reads the addresses,
    at send time (allocation asks only which customers are reachable on a channel). ``customer_id``
    is the customer's pseudonym, like everywhere else; ``external_id`` is the shop's own customer
    id, the direct identifier, which no other table holds (see :mod:`mlpkg.privacy`).
    """

    __tablename__ = "contacts"
    customer_id: Mapped[str] = mapped_column(ForeignKey("customers.customer_id"), primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    phone: Mapped[str | None] = mapped_column(String(32), nullable=True)
    push_token: Mapped[str | None] = mapped_column(String(512), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(TS)


class Event(Base):
    """A behaviour event (page view, search, cart add, message engagement)."""

    __tablename__ = "events"
    # On SQLite the rows live in the key's B-tree alone (no rowid table beside the key's index):
    # a bulk load writes each event once instead of twice. Other engines ignore the option.
    __table_args__ = {"sqlite_with_rowid": False}
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # No secondary index: features read the event store (EventPart), and a bulk load of millions
    # of rows would spend most of its time keeping ``customer_id`` and ``ts`` indexes. No foreign
    # key either: the data contract checks every batch's customer ids against the stored and the
    # batch's customers, and PostgreSQL's per-row foreign-key trigger costs more than the load.
    customer_id: Mapped[str] = mapped_column(String(64))
    ts: Mapped[datetime] = mapped_column(TS)
    event_type: Mapped[str] = mapped_column(String(32))
    category: Mapped[str] = mapped_column(String(64), default="")
    # The product the event was about (NULL: none, or an export made before products existed).
    product_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class EventPart(Base):
    """One Parquet part of the columnar event store: the new events of one loaded events file.

    The part is written before its load commits and listed here in the same transaction, so a
    reader sees exactly the events the warehouse holds (an unlisted file is a crashed load's).
    """

    __tablename__ = "event_parts"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    rows: Mapped[int] = mapped_column(Integer)
    batch: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(TS)


class Order(Base):
    """A placed order."""

    __tablename__ = "orders"
    order_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer_id: Mapped[str] = mapped_column(ForeignKey("customers.customer_id"), index=True)
    ts: Mapped[datetime] = mapped_column(TS, index=True)
    revenue: Mapped[float] = mapped_column(Float)
    n_items: Mapped[int] = mapped_column(Integer)
    coupon_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    product_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    __table_args__ = (CheckConstraint("revenue >= 0", name="revenue_nonneg"),)


class Recommendation(Base):
    """One customer's ranked product for a campaign's messages, made by the recommender.

    Keyed by campaign, customer and rank, so re-running the stage for a campaign rewrites the
    same rows. ``model_version`` names the registered recommender version that scored them.
    """

    __tablename__ = "recommendations"
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.campaign_id"), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(TS)


class IngestedFile(Base):
    """A raw file loaded into the warehouse; its checksum makes reloads no-ops."""

    __tablename__ = "ingested_files"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    table_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    batch: Mapped[str] = mapped_column(String(128))
    file_name: Mapped[str] = mapped_column(String(512))
    rows: Mapped[int] = mapped_column(Integer)
    loaded_at: Mapped[datetime] = mapped_column(TS)


#: A measured campaign's training log is named this prefix plus the campaign id.
CAMPAIGN_LOG_PREFIX = "campaign:"


class CampaignLog(Base):
    """A historical campaign (simulated or imported) usable for training and evaluation."""

    __tablename__ = "campaign_logs"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    source: Mapped[str] = mapped_column(String(512))
    control_label: Mapped[str] = mapped_column(String(64))
    arm_costs: Mapped[dict] = mapped_column(JSON)
    spec: Mapped[dict] = mapped_column(JSON)
    assumed_randomized: Mapped[bool] = mapped_column(Boolean, default=False)
    n_rows: Mapped[int] = mapped_column(Integer)
    sent_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    imported_at: Mapped[datetime] = mapped_column(TS)


class CampaignLogRow(Base):
    """One customer's row of a historical campaign: arm, propensity, outcomes, features."""

    __tablename__ = "campaign_log_rows"
    log_name: Mapped[str] = mapped_column(ForeignKey("campaign_logs.name"), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    arm: Mapped[str] = mapped_column(String(128))
    propensity: Mapped[float] = mapped_column(Float)
    converted: Mapped[int] = mapped_column(Integer)
    revenue: Mapped[float] = mapped_column(Float, default=0.0)
    outcomes: Mapped[dict] = mapped_column(JSON, default=dict)
    features: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    __table_args__ = (
        CheckConstraint("propensity > 0 AND propensity <= 1", name="propensity_range"),
        CheckConstraint("converted IN (0, 1)", name="converted_binary"),
    )


class Campaign(Base):
    """A campaign run by CouponOps; ``committed`` spend can never exceed ``budget``."""

    __tablename__ = "campaigns"
    campaign_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(TS)
    as_of: Mapped[datetime] = mapped_column(TS)
    budget: Mapped[float] = mapped_column(Float)
    committed: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    objective: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    run_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    lock_owner: Mapped[str | None] = mapped_column(String(256), nullable=True)
    summary: Mapped[dict] = mapped_column(JSON, default=dict)
    __table_args__ = (
        CheckConstraint("budget >= 0", name="budget_nonneg"),
        # A tiny tolerance absorbs float rounding of sums; real overspend is rejected.
        CheckConstraint("committed >= 0 AND committed <= budget + 1e-6", name="committed_within_budget"),
        CheckConstraint(
            "status IN ('allocating', 'allocated', 'delivered', 'measured')", name="status_known"
        ),
    )


class Allocation(Base):
    """The coupon ledger: one row per customer of a campaign's population."""

    __tablename__ = "allocations"
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.campaign_id"), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    arm: Mapped[str] = mapped_column(String(128))
    coupon_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    channel: Mapped[str | None] = mapped_column(String(16), nullable=True)
    policy: Mapped[str] = mapped_column(String(16))
    propensity: Mapped[float] = mapped_column(Float)
    # What the model policy would have chosen: lets control customers stand in for each arm's
    # counterfactual when measuring incrementality per coupon and channel.
    model_arm: Mapped[str] = mapped_column(String(128), default="control")
    expected_cost: Mapped[float] = mapped_column(Float, default=0.0)
    expected_value: Mapped[float] = mapped_column(Float, default=0.0)
    expected_uplift: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(TS)
    __table_args__ = (
        CheckConstraint("policy IN ('model', 'explore', 'control')", name="policy_known"),
        CheckConstraint("propensity > 0 AND propensity <= 1", name="propensity_range"),
        CheckConstraint("expected_cost >= 0", name="cost_nonneg"),
        Index("ix_allocations_customer_created", "customer_id", "created_at"),
    )


#: Why a ledger row got its arm or none (``allocation_reasons.binding``): the deciding fact.
REASON_CODES = (
    "model_choice", "exploration_draw", "control_group", "cooldown", "consent", "not_eligible",
    "budget", "inventory", "capacity", "fairness", "no_gain", "repair", "cold_start",
)  # fmt: skip


class AllocationReason(Base):
    """Why one ledger row (campaign, customer) got its arm or none; written with the ledger.

    ``binding`` names the deciding fact (:data:`REASON_CODES`); ``constraints`` lists every fact
    that shaped the decision (``{"constraint", "detail", ...}``, the deciding one first);
    ``explained_arm`` is the arm whose uplift ``attributions`` explain (the row's arm, or for a
    customer given none the arm the model ranks best); ``runner_up`` is the best alternative to
    the row's arm (``control`` = no coupon) and ``margin`` the row's arm's priced objective minus
    the runner-up's, at the solver's prices (negative: the alternative looked better but a draw
    or a cap decided).
    """

    __tablename__ = "allocation_reasons"
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.campaign_id"), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    binding: Mapped[str] = mapped_column(String(32))
    explained_arm: Mapped[str | None] = mapped_column(String(128), nullable=True)
    runner_up: Mapped[str | None] = mapped_column(String(128), nullable=True)
    margin: Mapped[float | None] = mapped_column(Float, nullable=True)
    uplift: Mapped[float | None] = mapped_column(Float, nullable=True)
    method: Mapped[str | None] = mapped_column(String(32), nullable=True)
    constraints: Mapped[list] = mapped_column(JSON, default=list)
    attributions: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(TS)
    __table_args__ = (
        CheckConstraint(
            "binding IN (" + ", ".join(f"'{c}'" for c in REASON_CODES) + ")", name="binding_known"
        ),
    )


class Delivery(Base):
    """Outbox row: one message to send; ``dedup_key`` makes sends exactly-once in effect.

    A treated customer without a contact for the channel, or not opted in to it at the send time,
    gets a ``skipped`` row (the reason in ``last_error``) so the ledger shows why no message went
    out. The row holds no address: the sender reads it from ``contacts`` at send time.
    """

    __tablename__ = "deliveries"
    delivery_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dedup_key: Mapped[str] = mapped_column(String(256), unique=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.campaign_id"), index=True)
    customer_id: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    coupon_id: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    provider_message_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TS)
    sent_at: Mapped[datetime | None] = mapped_column(TS, nullable=True)
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'sending', 'sent', 'failed', 'bounced', 'skipped')", name="status_known"
        ),
        Index("ix_deliveries_status_channel", "status", "channel"),
    )


class FeedbackEvent(Base):
    """A customer response (delivered/open/click/redeem/order) after a campaign."""

    __tablename__ = "feedback_events"
    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(String(128), index=True)
    customer_id: Mapped[str] = mapped_column(String(64), index=True)
    event_type: Mapped[str] = mapped_column(String(16))
    ts: Mapped[datetime] = mapped_column(TS)
    coupon_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    channel: Mapped[str | None] = mapped_column(String(16), nullable=True)
    order_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    revenue: Mapped[float] = mapped_column(Float, default=0.0)
    ingested_at: Mapped[datetime] = mapped_column(TS)
    __table_args__ = (CheckConstraint("revenue >= 0", name="revenue_nonneg"),)


class CampaignMetric(Base):
    """Measured outcome of a campaign for one breakdown (overall, coupon, channel, segment)."""

    __tablename__ = "campaign_metrics"
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.campaign_id"), primary_key=True)
    breakdown: Mapped[str] = mapped_column(String(32), primary_key=True)
    breakdown_value: Mapped[str] = mapped_column(String(128), primary_key=True)
    metrics: Mapped[dict] = mapped_column(JSON)
    computed_at: Mapped[datetime] = mapped_column(TS)


class ModelPromotion(Base):
    """An alias move in the model registry: who moved which alias, why and when."""

    __tablename__ = "model_promotions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(256))
    alias: Mapped[str] = mapped_column(String(32))
    version: Mapped[str] = mapped_column(String(32))
    previous_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(TS)


class TrainingRun(Base):
    """A model training run and the data it saw (feeds the retraining counters)."""

    __tablename__ = "training_runs"
    mlflow_run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    trained_at: Mapped[datetime] = mapped_column(TS)
    n_rows: Mapped[int] = mapped_column(Integer)
    labelled_rows_seen: Mapped[int] = mapped_column(Integer)
    snapshot_id: Mapped[str] = mapped_column(String(64))
    run_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    __table_args__ = (UniqueConstraint("run_key", name="uq_training_runs_run_key"),)


class RetrainDecision(Base):
    """Whether feedback triggered retraining, and why."""

    __tablename__ = "retrain_decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    decided_at: Mapped[datetime] = mapped_column(TS)
    run_key: Mapped[str] = mapped_column(String(256))
    retrain: Mapped[bool] = mapped_column(Boolean)
    reasons: Mapped[dict] = mapped_column(JSON)


class LandedBatch(Base):
    """A landing-zone drop that was handled (loaded or quarantined): each is read exactly once."""

    __tablename__ = "landed_batches"
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    drop_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    exported_at: Mapped[datetime] = mapped_column(TS)
    status: Mapped[str] = mapped_column(String(16))
    handled_at: Mapped[datetime] = mapped_column(TS)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    __table_args__ = (
        CheckConstraint("kind IN ('batches', 'feedback')", name="kind_known"),
        CheckConstraint("status IN ('loaded', 'quarantined')", name="status_known"),
    )


class PrivacyAudit(Base):
    """A privacy operation: a customer forgotten or behaviour purged, by whom, when and why.

    ``pseudonym`` is the forgotten customer's keyed pseudonym (never the shop's id): it is the
    tombstone that keeps a later export of that customer out of the warehouse.
    """

    __tablename__ = "privacy_audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    action: Mapped[str] = mapped_column(String(16))
    pseudonym: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(TS)
    __table_args__ = (CheckConstraint("action IN ('forget', 'purge')", name="action_known"),)
