"""Ingest raw shop exports into the warehouse, and read modelling frames back out of it.

A *batch* is a folder of raw files (``customers.csv``, ``events.parquet``, ...). Ingestion
validates the whole batch first (see :mod:`mlpkg.validation`), then loads every new file in one
transaction with upserts keyed by natural keys. A file whose checksum was loaded before is
skipped, so loading the same batch twice changes nothing, and a batch with any bad file loads
nothing at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine, select

from mlpkg.config import Settings
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope

# Load order respects foreign keys (channels/customers before contacts and consent, customers
# before events).
RAW_FILES: dict[str, tuple[str, ...]] = {
    "channels": ("channels.csv", "channels.parquet"),
    "coupons": ("coupons.csv", "coupons.parquet"),
    "customers": ("customers.csv", "customers.parquet"),
    "contacts": ("contacts.csv", "contacts.parquet"),
    "consent": ("consent.csv", "consent.parquet"),
    "events": ("events.parquet", "events.csv"),
    "orders": ("orders.csv", "orders.parquet"),
    "campaign_log": ("campaign_log.csv", "campaign_log.parquet"),
    "feedback": ("feedback.csv", "feedback.parquet"),
}

#: Contact columns of ``contacts.csv``: personal data that only delivery reads (never features).
CONTACT_COLUMNS: tuple[str, ...] = ("email", "phone", "push_token")


@dataclass
class IngestReport:
    """What one ingestion did."""

    batch: str
    loaded: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    data_docs: str | None = None

    def as_dict(self) -> dict:
        """Return a JSON-friendly dict (for XCom and logs)."""
        return {
            "batch": self.batch,
            "loaded": self.loaded,
            "skipped": self.skipped,
            "warnings": self.warnings,
            "data_docs": self.data_docs,
        }


def discover_batch(batch_dir: Path) -> dict[str, Path]:
    """Map table names to the raw files present in ``batch_dir``.

    Raises:
        FileNotFoundError: the folder does not exist or holds no known raw file.
    """
    batch_dir = Path(batch_dir)
    if not batch_dir.is_dir():
        raise FileNotFoundError(f"batch folder {batch_dir} does not exist")
    found: dict[str, Path] = {}
    for table, names in RAW_FILES.items():
        for name in names:
            if (batch_dir / name).exists():
                found[table] = batch_dir / name
                break
    if not found:
        expected = ", ".join(n for names in RAW_FILES.values() for n in names[:1])
        raise FileNotFoundError(
            f"batch folder {batch_dir} holds none of the raw files CouponOps reads ({expected})"
        )
    return found


def _py(value):  # noqa: ANN001, ANN202 - converts any pandas scalar to a DB-friendly Python value
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _records(df: pd.DataFrame, columns: list[str]) -> list[dict]:
    cols = [c for c in columns if c in df.columns]
    values = df[cols].astype(object).where(df[cols].notna(), None).to_numpy()
    return [{c: _py(v) for c, v in zip(cols, row, strict=True)} for row in values]


def _load_table(session, table: str, df: pd.DataFrame, now: datetime) -> int:  # noqa: ANN001
    if table == "channels":
        return q.upsert_rows(session, m.Channel, _records(df, ["channel", "send_cost", "daily_capacity"]))
    if table == "coupons":
        cols = ["coupon_id", "kind", "face_value", "min_basket", "inventory", "valid_from", "valid_to"]
        return q.upsert_rows(session, m.Coupon, _records(df, cols))
    if table == "customers":
        df = df.assign(signup_date=pd.to_datetime(df["signup_date"]).dt.date)
        return q.upsert_rows(
            session, m.Customer, _records(df, ["customer_id", "signup_date", "region", "device", "segment"])
        )
    if table == "contacts":
        # An empty value in the file means "no contact on that channel": stored as NULL.
        df = df.assign(**{c: df[c].replace("", None) for c in CONTACT_COLUMNS})
        cols = ["customer_id", *CONTACT_COLUMNS, "updated_at"]
        return q.upsert_rows(session, m.Contact, _records(df, cols))
    if table == "consent":
        df = df.assign(opted_in=df["opted_in"].astype(bool))
        return q.upsert_rows(
            session, m.Consent, _records(df, ["customer_id", "channel", "opted_in", "updated_at"])
        )
    if table == "events":
        df = df.assign(category=df["category"].fillna(""))
        cols = ["event_id", "customer_id", "ts", "event_type", "category"]
        return q.upsert_rows(session, m.Event, _records(df, cols))
    if table == "orders":
        df = df.assign(coupon_id=df["coupon_id"].replace("", None))
        cols = ["order_id", "customer_id", "ts", "revenue", "n_items", "coupon_id"]
        return q.upsert_rows(session, m.Order, _records(df, cols))
    if table == "campaign_log":
        return _load_campaign_log(session, df, now)
    if table == "feedback":
        df = df.assign(ingested_at=now)
        for col in ("coupon_id", "channel", "order_id"):
            df[col] = df[col].replace("", None)
        cols = [
            "event_id",
            "campaign_id",
            "customer_id",
            "event_type",
            "ts",
            "coupon_id",
            "channel",
            "order_id",
            "revenue",
            "ingested_at",
        ]
        # Feedback events are immutable facts: a replayed event keeps its first ingestion.
        return q.upsert_rows(session, m.FeedbackEvent, _records(df, cols), update_existing=False)
    raise ValueError(f"unknown raw table {table!r}")


def _load_campaign_log(session, df: pd.DataFrame, now: datetime) -> int:  # noqa: ANN001
    """Load a simulator/shop-format campaign log (features come from the warehouse as of sent_at)."""
    total = 0
    for name, part in df.groupby("campaign_id", sort=True):
        treated = part[part["arm"] != "control"]
        costs = treated.groupby("arm")["coupon_cost"].mean().round(4).to_dict() if len(treated) else {}
        q.upsert_rows(
            session,
            m.CampaignLog,
            [
                dict(
                    name=str(name),
                    source="shop-export",
                    control_label="control",
                    arm_costs=costs,
                    spec={"format": "shop-export"},
                    assumed_randomized=False,
                    n_rows=len(part),
                    sent_at=pd.Timestamp(part["sent_at"].min()).to_pydatetime(),
                    imported_at=now,
                )
            ],
        )
        outcomes = part[["opened", "clicked", "redeemed", "coupon_cost"]].astype(float).to_dict("records")
        rows = [
            dict(
                log_name=str(name),
                customer_id=cid,
                arm=arm,
                propensity=float(p),
                converted=int(c),
                revenue=float(r),
                outcomes=o,
                features=None,
            )
            for cid, arm, p, c, r, o in zip(
                part["customer_id"],
                part["arm"],
                part["propensity"],
                part["converted"],
                part["revenue"],
                outcomes,
                strict=True,
            )
        ]
        total += q.upsert_rows(session, m.CampaignLogRow, rows)
    return total


def ingest_batch(engine: Engine, batch_dir: Path, settings: Settings, *, now: datetime) -> IngestReport:
    """Validate a raw batch and load its new files into the warehouse in one transaction.

    Raises:
        mlpkg.validation.DataContractError: the batch broke its data contract; it was moved to
            the quarantine folder and the warehouse is unchanged.
    """
    from mlpkg.validation import ValidationContext, gate_batch
    from mlpkg.validation.contract import DEFAULT_CHANNELS

    batch_dir = Path(batch_dir)
    files = discover_batch(batch_dir)
    report = IngestReport(batch=batch_dir.name)
    with session_scope(engine) as session:
        sums = {t: q.file_sha256(p) for t, p in files.items()}
        new = {t: p for t, p in files.items() if not q.is_file_ingested(session, sums[t], t)}
        report.skipped = sorted(set(files) - set(new))
        context = ValidationContext(
            known_customers=frozenset(q.known_ids(session, m.Customer.customer_id)),
            known_coupons=frozenset(q.known_ids(session, m.Coupon.coupon_id)),
            channels=frozenset(q.known_ids(session, m.Channel.channel)) or DEFAULT_CHANNELS,
            now=now,
            previous_row_counts=_previous_counts(session),
            strict=settings.strict_columns,
        )
    if not new:
        return report
    result = gate_batch(
        batch_dir,
        context=context,
        quarantine_dir=settings.quarantine_dir,
        data_docs_dir=settings.data_docs_dir,
    )
    report.warnings = list(result.warnings) + [
        f"{table}: {w.describe(1)}" for table, rep in result.reports.items() for w in rep.warnings
    ]
    report.data_docs = str(result.data_docs_index) if result.data_docs_index else None
    with session_scope(engine) as session:
        for table in RAW_FILES:
            if table not in new:
                continue
            df = result.frames[table]
            report.loaded[table] = _load_table(session, table, df, now)
            q.record_ingested_file(
                session,
                sha256=sums[table],
                table=table,
                batch=batch_dir.name,
                file_name=new[table].name,
                rows=len(df),
                now=now,
            )
    return report


# Full-snapshot tables are comparable batch to batch; event tables are incremental (a day's
# events vs a 180-day backfill), so a volume rule on them would reject every normal batch.
_SNAPSHOT_TABLES = ("customers", "contacts", "consent", "channels", "coupons")


def _previous_counts(session) -> dict[str, int]:  # noqa: ANN001
    """Row counts of the last loaded snapshot file per table (for volume-anomaly checks)."""
    stmt = (
        select(m.IngestedFile)
        .where(m.IngestedFile.table_name.in_(_SNAPSHOT_TABLES))
        .order_by(m.IngestedFile.loaded_at)
    )
    last: dict[str, int] = {}
    for row in session.execute(stmt).scalars():
        last[row.table_name] = row.rows
    return last


# --- frames for modelling ---------------------------------------------------------------------------


# Customer ids per IN list when reading one shard's history.
_ID_CHUNK = 5_000


def read_history(
    engine: Engine, as_of: datetime, customer_ids: list[str] | None = None
) -> dict[str, pd.DataFrame]:
    """Read customers, consent, events and orders strictly before ``as_of`` (point in time).

    Args:
        engine: The warehouse.
        as_of: The point in time; rows at or after it are not read.
        customer_ids: Only these customers' rows (one scoring shard); all customers when ``None``.
    """
    tables = {
        "customers": (select(m.Customer), m.Customer.customer_id),
        "consent": (select(m.Consent).where(m.Consent.updated_at < as_of), m.Consent.customer_id),
        "events": (select(m.Event).where(m.Event.ts < as_of), m.Event.customer_id),
        "orders": (select(m.Order).where(m.Order.ts < as_of), m.Order.customer_id),
    }
    out: dict[str, pd.DataFrame] = {}
    with engine.connect() as conn:
        for name, (stmt, id_col) in tables.items():
            if customer_ids is None:
                out[name] = pd.read_sql(stmt, conn)
                continue
            # Bounded IN lists: SQLite caps bound parameters, and PostgreSQL plans short lists well.
            parts = [
                pd.read_sql(stmt.where(id_col.in_(customer_ids[i : i + _ID_CHUNK])), conn)
                for i in range(0, len(customer_ids), _ID_CHUNK)
            ]
            out[name] = pd.concat(parts, ignore_index=True) if parts else pd.read_sql(stmt.limit(0), conn)
    for df in (out["events"], out["orders"], out["consent"]):
        for col in ("ts", "updated_at"):
            if col in df.columns:
                df[col] = pd.to_datetime(df[col], utc=True)
    return out


def customer_features(engine: Engine, as_of: datetime, customer_ids: list[str] | None = None) -> pd.DataFrame:
    """Build the point-in-time feature table as of ``as_of`` of every customer, or of ``customer_ids``."""
    from mlpkg.features import build_features

    hist = read_history(engine, as_of, customer_ids)
    return build_features(
        hist["customers"], hist["events"], hist["orders"], pd.Timestamp(as_of), consent=hist["consent"]
    )


def training_frame(engine: Engine, log_names: list[str] | None = None) -> pd.DataFrame:
    """Join campaign-log rows with features as of each log's send time.

    Returns:
        The model input frame: customer_id, feature columns, arm, converted, revenue, propensity.
    """
    with engine.connect() as conn:
        logs = pd.read_sql(select(m.CampaignLog), conn)
        if log_names:
            logs = logs[logs["name"].isin(log_names)]
        if logs.empty:
            raise LookupError(
                "the warehouse holds no campaign log to train on; ingest a batch or import a log"
            )
        frames = []
        for log in logs.itertuples():
            rows = pd.read_sql(select(m.CampaignLogRow).where(m.CampaignLogRow.log_name == log.name), conn)
            frames.append((log, rows))
    out = []
    for log, rows in frames:
        if rows["features"].notna().all():
            feats = pd.json_normalize(rows["features"].tolist())
            feats.insert(0, "customer_id", rows["customer_id"].to_numpy())
        else:
            feats = customer_features(engine, pd.Timestamp(log.sent_at).to_pydatetime())
        arm = rows["arm"].where(rows["arm"] != log.control_label, "control")
        frame = rows[["customer_id", "converted", "revenue", "propensity"]].assign(arm=arm, log_name=log.name)
        out.append(frame.merge(feats, on="customer_id", how="inner"))
    return pd.concat(out, ignore_index=True)
