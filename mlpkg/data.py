"""Ingest raw shop exports into the warehouse, and read modelling frames back out of it.

A *batch* is a folder of raw files (``customers.csv``, ``events.parquet``, ...). Ingestion
validates the whole batch first (see :mod:`mlpkg.validation`), then loads every new file in one
transaction with upserts keyed by natural keys. A file whose checksum was loaded before is
skipped, so loading the same batch twice changes nothing, and a batch with any bad file loads
nothing at all.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Boolean, Date, DateTime, Engine, Numeric, String, select, type_coerce

from mlpkg import event_store
from mlpkg.config import Settings
from mlpkg.db import bulk
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.features import CAMPAIGN_KINDS, build_features, summarise_events

_log = logging.getLogger(__name__)

# Load order respects foreign keys (channels/customers before contacts and consent, customers
# before events). The names are the usual ones; any letter case is accepted (``Orders.CSV``), and
# one table may come as exactly one file (see mlpkg.validation.readers.scan_batch).
RAW_FILES: dict[str, tuple[str, ...]] = {
    table: tuple(f"{table}{suffix}" for suffix in suffixes)
    for table, suffixes in {
        "channels": (".csv", ".csv.gz", ".parquet"),
        "coupons": (".csv", ".csv.gz", ".parquet"),
        "products": (".csv", ".csv.gz", ".parquet"),
        "customers": (".csv", ".csv.gz", ".parquet"),
        "contacts": (".csv", ".csv.gz", ".parquet"),
        "consent": (".csv", ".csv.gz", ".parquet"),
        "events": (".parquet", ".csv", ".csv.gz"),
        "orders": (".csv", ".csv.gz", ".parquet"),
        "campaign_log": (".csv", ".csv.gz", ".parquet"),
        "feedback": (".csv", ".csv.gz", ".parquet"),
    }.items()
}

#: Source (and owner kind) of campaign logs that arrive in a shop batch.
SHOP_LOG_SOURCE = "shop-export"

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
    validation_summary: str | None = None
    dry_run: bool = False
    changes: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Rows of forgotten customers left out, per table (a shop export that still holds them).
    forgotten_rows_dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Return a JSON-friendly dict (for XCom and logs)."""
        return {
            "batch": self.batch,
            "loaded": self.loaded,
            "skipped": self.skipped,
            "warnings": self.warnings,
            "data_docs": self.data_docs,
            "validation_summary": self.validation_summary,
            "dry_run": self.dry_run,
            "changes": self.changes,
            "forgotten_rows_dropped": self.forgotten_rows_dropped,
        }


def discover_batch(batch_dir: Path, *, protected: tuple[Path, ...] = ()) -> dict[str, Path]:
    """Map table names to the raw files present in ``batch_dir`` (names in any letter case).

    Nothing is read. Files the gate will refuse (symbolic links, two files of one table, other
    compressed files) are left out here; the gate quarantines the batch for them.

    Args:
        batch_dir: The batch folder.
        protected: Folders the batch may neither be nor contain (the state folder); the working
            directory, ``/`` and the home folder always are.

    Raises:
        FileNotFoundError: the folder does not exist or holds no raw file and nothing refused.
        mlpkg.validation.DataContractError: the folder is a symbolic link, the working directory,
            ``/``, the home folder or a protected folder, or contains one (nothing is read or moved).
    """
    from mlpkg.validation.readers import resolve_batch_folder, scan_batch

    batch_dir = resolve_batch_folder(batch_dir, protected=protected)
    scan = scan_batch(batch_dir)
    found = {t: scan.tables[t] for t in RAW_FILES if t in scan.tables}
    if not found and not scan.failures:
        expected = ", ".join(n for names in RAW_FILES.values() for n in names[:1])
        seen = f" (it holds {', '.join(p.name for p in scan.others)})" if scan.others else ""
        raise FileNotFoundError(
            f"batch folder {batch_dir} holds none of the raw files CouponOps reads ({expected}){seen}"
        )
    return found


def _refused_files(batch_dir: Path) -> bool:
    """Return whether the gate refuses some file of the batch (it must run even if nothing is new)."""
    from mlpkg.validation.readers import scan_batch

    return bool(scan_batch(Path(batch_dir)).failures)


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
    """Write one validated table; facts are inserted once, snapshot tables take the newer state.

    The gate has already refused any row that contradicts a stored fact (see
    :mod:`mlpkg.validation.references`), so inserting with "do nothing" on a stored key only
    skips identical replays; an order flagged ``is_correction`` is the one explicit overwrite.
    """
    if table == "channels":
        # A snapshot of settings: the newer cost and capacity replace the older.
        return q.upsert_rows(session, m.Channel, _records(df, ["channel", "send_cost", "daily_capacity"]))
    if table == "coupons":
        # kind, face value and minimum basket are immutable (checked by the gate); inventory and
        # validity are the catalogue's current state. ``issued`` is ours and never in the file.
        cols = ["coupon_id", "kind", "face_value", "min_basket", "inventory", "valid_from", "valid_to"]
        return q.upsert_rows(session, m.Coupon, _records(df, cols))
    if table == "products":
        # The catalogue's current state: the newer category, price and stock replace the older.
        df = df.assign(in_stock=df["in_stock"].astype(bool))
        cols = ["product_id", "category", "price", "in_stock"]
        return q.upsert_rows(session, m.Product, _records(df, cols))
    if table == "customers":
        # signup_date is immutable (checked by the gate); region, device and segment follow the shop.
        df = df.assign(signup_date=pd.to_datetime(df["signup_date"]).dt.date)
        return q.upsert_rows(
            session, m.Customer, _records(df, ["customer_id", "signup_date", "region", "device", "segment"])
        )
    if table == "contacts":
        # An empty value in the file means "no contact on that channel": stored as NULL.
        df = df.assign(**{c: df[c].replace("", None) for c in CONTACT_COLUMNS})
        cols = ["customer_id", "external_id", *CONTACT_COLUMNS, "updated_at"]
        return q.upsert_rows(session, m.Contact, _records(df, cols))
    if table == "consent":
        # A history of events, never overwritten: an older opt-in arriving late cannot undo an opt-out.
        df = df.assign(opted_in=df["opted_in"].astype(bool))
        cols = ["customer_id", "channel", "opted_in", "updated_at"]
        return q.record_consent_events(session, _records(df, cols))
    if table == "orders":
        from mlpkg.validation.references import correction_flags

        df = df.assign(coupon_id=df["coupon_id"].replace("", None),
                       product_id=df["product_id"].replace("", None))
        cols = ["order_id", "customer_id", "ts", "revenue", "n_items", "coupon_id", "product_id"]
        corrected = correction_flags(df)[0].to_numpy()
        n = q.upsert_rows(session, m.Order, _records(df[~corrected], cols), update_existing=False)
        return n + q.upsert_rows(session, m.Order, _records(df[corrected], cols))
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
    """Load a shop-format campaign log (features come from the warehouse as of sent_at).

    A log keeps its shop name (``hist-...``); rows already stored for a customer are kept (the gate
    refused any that would change), and a later batch can only add customers to the log. The gate
    also refuses a name that another source (an imported or a measured log) owns.
    """
    total = 0
    for name, part in df.groupby("campaign_id", sort=True):
        name = str(name)
        treated = part[part["arm"] != "control"]
        costs = treated.groupby("arm")["coupon_cost"].mean().round(4).to_dict() if len(treated) else {}
        sent_at = pd.Timestamp(part["sent_at"].min()).to_pydatetime()
        outcomes = part[["opened", "clicked", "redeemed", "coupon_cost"]].astype(float).to_dict("records")
        rows = [
            dict(
                log_name=name,
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
        existing = session.get(m.CampaignLog, name)
        if existing is None:
            session.add(
                m.CampaignLog(
                    name=name,
                    source=SHOP_LOG_SOURCE,
                    control_label="control",
                    arm_costs=costs,
                    spec={"format": SHOP_LOG_SOURCE},
                    assumed_randomized=False,
                    n_rows=len(part),
                    sent_at=sent_at,
                    imported_at=now,
                )
            )
            session.flush()
        total += q.upsert_rows(session, m.CampaignLogRow, rows, update_existing=False)
        if existing is not None:
            existing.n_rows = q.count_log_rows(session, name)
            existing.arm_costs = {**costs, **(existing.arm_costs or {})}
            if existing.sent_at is None or q.as_utc(sent_at) < q.as_utc(existing.sent_at):
                existing.sent_at = sent_at
    return total



class _LoadRefused(Exception):
    """Rows of a streamed file contradict stored rows (found while loading; the load rolls back)."""

    def __init__(self, table: str, failures: list) -> None:
        super().__init__(table)
        self.table = table
        self.failures = failures


class _EventLoad:
    """Insert a file's events chunk by chunk (bulk) into the batch's transaction, skipping replays.

    Called with each chunk (the gate's stream sink: ``load("events", first_row, chunk)``), so the
    database ingests one chunk while the gate validates the next. Rows whose key is new are
    inserted in bulk and written to the event store; when some key was stored already the chunk
    is compared with the stored rows: a contradiction refuses the batch (:class:`_LoadRefused`),
    identical replays are left out of the store. An error stops the load and is raised by
    :meth:`finish`, after the gate had its say (its verdict on the whole file comes first: a key
    repeated in a later chunk looks like a stored key here). :meth:`close` waits for the chunk in
    flight, so the session's connection is idle before the transaction ends.
    """

    def __init__(self, session, view: WarehouseView, writer: event_store.PartWriter) -> None:  # noqa: ANN001
        """Bind the load to the batch's session, the committed warehouse and the part writer."""
        self.view, self.writer = view, writer
        # The warehouse keeps each event's product; the event store's parts keep what features read.
        self.columns = [*event_store.COLUMNS, "product_id"]
        self.loader = bulk.ChunkLoader(session, m.Event.__table__, self.columns)
        self.rows = self.inserted = 0
        self.error: BaseException | None = None

    def __call__(self, table: str, start: int, chunk: pd.DataFrame) -> None:
        """Queue one validated chunk of ``table`` (only events are loaded this way)."""
        if table != "events" or self.error is not None:
            return
        self.rows += len(chunk)
        frame = chunk.assign(
            category=chunk["category"].fillna(""),
            product_id=chunk["product_id"].where(chunk["product_id"].fillna("") != "", None),
        )[self.columns]
        try:
            for done in self.loader.submit(start, frame):
                self._finished(*done)
        except Exception as err:  # noqa: BLE001 - kept for finish(): the gate's refusal comes first
            self.error = err

    def _finished(self, start: int, frame: pd.DataFrame, added: int) -> None:
        from mlpkg.validation.references import contradictions_with  # GX is heavy: imported on use
        from mlpkg.validation.streaming import shift_rows

        if added < len(frame):
            # Some keys were stored before this batch (the view reads the committed warehouse).
            stored = self.view.stored_rows("events", list(frame["event_id"]))
            found = contradictions_with(frame, "events", stored)
            if found:
                raise _LoadRefused("events", [shift_rows(f, start) for f in found])
            frame = frame[~frame["event_id"].isin(set(stored["event_id"]))]
            if len(frame) != added:
                raise RuntimeError("events were stored by another load while this batch loaded; run it again")
        self.writer.write(frame)
        self.inserted += added

    def finish(self, expected_rows: int) -> int:
        """Wait for every chunk; raise the load's error; return the number of events inserted."""
        if self.error is None:
            try:
                for done in self.loader.drain():
                    self._finished(*done)
            except Exception as err:  # noqa: BLE001 - raised below, after close()
                self.error = err
        self.close()
        if self.error is not None:
            raise self.error
        if self.rows != expected_rows:
            raise RuntimeError(f"the events load saw {self.rows} of {expected_rows} rows; ingest again")
        return self.inserted

    def close(self) -> None:
        """Wait for the chunk in flight (idempotent); its error, if any, is :meth:`finish`'s to raise."""
        self.loader.close(raise_errors=False)


#: Warehouse model, key columns (raw name -> model column) and compared columns of each raw table.
_STORED: dict[str, tuple[type[m.Base], dict[str, str], tuple[str, ...]]] = {
    "channels": (m.Channel, {"channel": "channel"}, ("send_cost", "daily_capacity")),
    "coupons": (m.Coupon, {"coupon_id": "coupon_id"},
                ("kind", "face_value", "min_basket", "inventory", "valid_from", "valid_to")),
    "customers": (m.Customer, {"customer_id": "customer_id"}, ("signup_date", "region", "device", "segment")),
    "products": (m.Product, {"product_id": "product_id"}, ("category", "price", "in_stock")),
    "events": (m.Event, {"event_id": "event_id"}, ("customer_id", "ts", "event_type", "category")),
    "orders": (m.Order, {"order_id": "order_id"}, ("customer_id", "ts", "revenue", "n_items", "coupon_id")),
    "feedback": (
        m.FeedbackEvent,
        {"event_id": "event_id"},
        ("campaign_id", "customer_id", "event_type", "ts", "coupon_id", "channel", "order_id", "revenue"),
    ),
    "campaign_log": (m.CampaignLogRow, {"campaign_id": "log_name", "customer_id": "customer_id"},
                     ("arm", "propensity", "converted", "revenue")),
}


class WarehouseView:
    """Read-only answers about the warehouse for the gate's rules across batches.

    Implements :class:`mlpkg.validation.contract.WarehouseView`; every answer is read in its own
    short transaction before the batch loads.
    """

    def __init__(self, engine: Engine) -> None:
        """Bind the view to a warehouse."""
        self.engine = engine

    def stored_rows(self, table: str, keys: list) -> pd.DataFrame:
        """Return the stored rows of a raw table whose natural key is in ``keys`` (raw column names)."""
        model, key_map, columns = _STORED[table]
        raw_keys = list(key_map)
        # A null key is the not-null rule's business; it cannot match a stored row.
        keys = [k for k in keys if all(pd.notna(v) for v in (k if isinstance(k, tuple) else (k,)))]
        out: list[dict] = []
        with session_scope(self.engine) as session:
            if len(raw_keys) == 1:
                out = q.rows_by_key(
                    session, model, columns, [str(k) for k in keys], key_column=key_map[raw_keys[0]]
                )
            else:
                # Composite keys (campaign log rows): one IN list per leading value.
                by_first: dict[str, list[str]] = {}
                for first, second in keys:
                    by_first.setdefault(str(first), []).append(str(second))
                for first, seconds in by_first.items():
                    found = q.rows_by_key(session, model, columns, seconds, key_column=key_map[raw_keys[1]],
                                          where={key_map[raw_keys[0]]: first})
                    out += [{**r, key_map[raw_keys[0]]: first} for r in found]
        frame = pd.DataFrame(out, columns=[*{key_map[k]: None for k in raw_keys}, *columns])
        frame = frame.rename(columns={v: k for k, v in key_map.items()})
        return frame.astype({k: "str" for k in raw_keys})

    def campaigns(self) -> dict[str, datetime]:
        """Return every known campaign id and its send time."""
        with session_scope(self.engine) as session:
            return {k: q.as_utc(v).to_pydatetime() for k, v in q.campaign_send_times(session).items()}

    def campaign_ledger(self, campaign_ids: list[str]) -> pd.DataFrame:
        """Return the allocations of some campaigns with whether a message was sent."""
        with session_scope(self.engine) as session:
            rows = q.campaign_ledger_rows(session, [c for c in campaign_ids if pd.notna(c)])
        return pd.DataFrame(rows, columns=["campaign_id", "customer_id", "coupon_id", "delivered"])

    def order_facts(self, order_ids: list[str]) -> pd.DataFrame:
        """Return the stored customer and revenue of some order ids (orders and feedback orders)."""
        with session_scope(self.engine) as session:
            rows = q.order_facts(session, [o for o in order_ids if pd.notna(o)])
        return pd.DataFrame(rows, columns=["order_id", "customer_id", "revenue", "stored_in"])

    def log_owners(self) -> dict[str, str]:
        """Return each stored campaign log's name and owning source kind."""
        with session_scope(self.engine) as session:
            return q.campaign_log_owners(session)


def plan_changes(view: WarehouseView, frames: dict[str, pd.DataFrame], streamed: dict | None = None
                 ) -> dict[str, dict[str, int]]:
    """Count what loading validated frames would do per table: new, unchanged, updated and corrected rows.

    Facts (events, orders, feedback, campaign-log rows) that are stored already are unchanged
    replays, since the gate refuses contradictions; an order flagged ``is_correction`` that differs
    is corrected; a snapshot row (customers, coupons, channels) that differs is updated.
    """
    from mlpkg.validation.readers import RAW_SCHEMAS
    from mlpkg.validation.references import _comparable, correction_flags

    out: dict[str, dict[str, int]] = {}
    for table, file in (streamed or {}).items():
        # A large file is planned chunk by chunk, as it would load.
        counts: dict[str, int] = {}
        for _start, chunk in file.chunks():
            for kind, n in plan_changes(view, {table: chunk})[table].items():
                counts[kind] = counts.get(kind, 0) + n
        out[table] = counts
    for table, df in frames.items():
        if table not in _STORED:
            out[table] = {"rows": len(df)}
            continue
        schema = RAW_SCHEMAS[table]
        key = list(schema.key)
        keys = list(df[key[0]]) if len(key) == 1 else list(df[key].itertuples(index=False, name=None))
        stored = view.stored_rows(table, keys)
        frame = df.assign(_corr=correction_flags(df)[0].to_numpy() if table == "orders" else False)
        merged = frame.merge(stored, on=key, how="left", suffixes=("", "__stored"), indicator=True)
        found = (merged["_merge"] == "both").to_numpy()
        differ = np.zeros(len(merged), dtype=bool)
        for col in _STORED[table][2]:
            if col in df.columns and f"{col}__stored" in merged.columns:
                kind = schema.column(col).kind
                old = _comparable(merged[f"{col}__stored"], kind, col)
                differ |= (_comparable(merged[col], kind, col) != old).to_numpy()
        differ &= found
        corrected = differ & merged["_corr"].astype(bool).to_numpy()
        out[table] = {
            "new": int((~found).sum()),
            "unchanged": int((found & ~differ).sum()),
            "updated": int((differ & ~corrected).sum()),
            "corrected": int(corrected.sum()),
        }
    return out


def ingest_batch(
    engine: Engine, batch_dir: Path, settings: Settings, *, now: datetime, dry_run: bool = False
) -> IngestReport:
    """Validate a raw batch and load its new files into the warehouse in one transaction.

    Args:
        engine: The warehouse.
        batch_dir: The batch folder.
        settings: Settings (quarantine and Data Docs folders, strict columns).
        now: The run's time (ingestion stamp and the latest plausible timestamp).
        dry_run: Validate and report what would change (``report.changes``) without writing,
            moving or quarantining anything.

    Raises:
        mlpkg.validation.DataContractError: the batch broke its data contract (including a row that
            contradicts a stored fact or another file of the batch); it was moved to the quarantine
            folder and the warehouse is unchanged (in a dry run nothing is moved).
    """
    from mlpkg.privacy import pseudonymiser
    from mlpkg.validation import ValidationContext, gate_batch
    from mlpkg.validation.contract import DEFAULT_CHANNELS

    batch_dir = Path(batch_dir)
    files = discover_batch(batch_dir, protected=(settings.state_dir,))
    report = IngestReport(batch=batch_dir.name, dry_run=dry_run)
    view = WarehouseView(engine)
    # The shop's customer ids become keyed pseudonyms before any rule sees them (mlpkg.privacy).
    pseudonymise = pseudonymiser(engine, settings)
    with session_scope(engine) as session:
        sums = {t: q.file_sha256(p) for t, p in files.items()}
        new = {t: p for t, p in files.items() if not q.is_file_ingested(session, sums[t], t)}
        report.skipped = sorted(set(files) - set(new))
        context = ValidationContext(
            known_customers=frozenset(q.known_ids(session, m.Customer.customer_id)),
            known_coupons=frozenset(q.known_ids(session, m.Coupon.coupon_id)),
            known_products=frozenset(q.known_ids(session, m.Product.product_id)),
            channels=frozenset(q.known_ids(session, m.Channel.channel)) or DEFAULT_CHANNELS,
            now=now,
            previous_row_counts=_previous_counts(session),
            strict=settings.strict_columns,
            chunk_rows=settings.ingest_chunk_rows,
            warehouse=view,
            pseudonymise=pseudonymise,
        )
    if not new and not _refused_files(batch_dir):
        return report
    if dry_run:
        result = _gate_dry_run(batch_dir, context)
        _gate_warnings(report, result)
        frames = {t: result.frames[t] for t in RAW_FILES if t in new and t in result.frames}
        # The gate read a copy of the batch; the plan reads the same files in the batch itself.
        streamed = {t: dataclasses.replace(f, path=new[t]) for t, f in result.streamed.items() if t in new}
        report.changes = plan_changes(view, frames, streamed)
        report.forgotten_rows_dropped = dict(pseudonymise.dropped)
        return report
    writer = event_store.PartWriter(settings.event_store_dir, sums["events"]) if "events" in new else None
    try:
        # One transaction for the batch. A large events file is loaded while the gate validates it
        # (chunk by chunk); a refusal by the gate or at load rolls every chunk back.
        with session_scope(engine) as session:
            events = _EventLoad(session, view, writer) if writer is not None else None
            try:
                result = gate_batch(
                    batch_dir,
                    context=context,
                    quarantine_dir=settings.quarantine_dir,
                    data_docs_dir=settings.data_docs_dir,
                    stream_sink=events,
                )
                if events is not None:
                    streamed = result.streamed.get("events")
                    if streamed is None:  # a small file: the gate read it whole
                        events("events", 0, result.frames["events"])
                    event_rows = streamed.rows if streamed else len(result.frames["events"])
                    # A streamed file's rows of forgotten customers never reached the load.
                    dropped = pseudonymise.dropped.get("events", 0) if streamed else 0
                    report.loaded["events"] = events.finish(event_rows - dropped)
            finally:
                if events is not None:
                    events.close()
            _gate_warnings(report, result)
            report.data_docs = str(result.data_docs_index) if result.data_docs_index else None
            report.validation_summary = str(result.summary_page) if result.summary_page else None
            _log.info("loading batch %s: %s in one transaction", batch_dir.name, ", ".join(sorted(new)))
            for table in RAW_FILES:
                if table not in new:
                    continue
                if table == "events":
                    writer.publish()
                    event_store.record_part(session, writer, batch=batch_dir.name, now=now)
                else:
                    report.loaded[table] = _load_table(session, table, result.frames[table], now)
                q.record_ingested_file(
                    session,
                    sha256=sums[table],
                    table=table,
                    batch=batch_dir.name,
                    file_name=new[table].name,
                    rows=event_rows if table == "events" else len(result.frames[table]),
                    now=now,
                )
    except _LoadRefused as refused:
        from mlpkg.validation import ValidationReport
        from mlpkg.validation.gate import refuse_batch

        writer.discard()
        reports = dict(result.reports)
        passed = reports[refused.table]  # the gate validated the file; the rules at load refuse it
        reports[refused.table] = ValidationReport(refused.table, passed.source, row_count=passed.row_count,
                                                  failures=refused.failures, gx_result=passed.gx_result)
        raise refuse_batch(batch_dir, reports, settings.quarantine_dir, docs=result.data_docs_index,
                           warnings=result.warnings) from None
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    report.forgotten_rows_dropped = dict(pseudonymise.dropped)
    if pseudonymise.dropped:
        _log.info("batch %s: left out the rows of forgotten customers: %s", batch_dir.name,
                  pseudonymise.dropped)
    return report


def _gate_warnings(report: IngestReport, result) -> None:  # noqa: ANN001 - BatchValidation
    """Copy the gate's warnings (batch-level and per table) into the ingest report."""
    report.warnings = list(result.warnings) + [
        f"{table}: {w.describe(1)}" for table, rep in result.reports.items() for w in rep.warnings
    ]


def _gate_dry_run(batch_dir: Path, context) -> object:  # noqa: ANN001 - ValidationContext, BatchValidation
    """Run the gate on a copy of the batch so a refusal moves nothing; re-raise it as a dry-run refusal."""
    import shutil
    import tempfile

    from mlpkg.validation import DataContractError, gate_batch

    with tempfile.TemporaryDirectory(prefix="couponops-dry-run-") as tmp:
        copy = Path(tmp) / batch_dir.name
        shutil.copytree(batch_dir, copy, symlinks=True)  # a link stays a link: the scan refuses it
        try:
            return gate_batch(copy, context=context, quarantine_dir=Path(tmp) / "quarantine",
                              data_docs_dir=Path(tmp) / "docs")
        except DataContractError as err:
            details = str(err).split("\n", 1)[1] if "\n" in str(err) else ""
            head = (f"dry run: batch '{batch_dir.name}' would be rejected by the data contract "
                    f"(nothing was written, moved or quarantined)")
            raise DataContractError(f"{head}\n{details}".rstrip(), failures=err.failures,
                                    reports=err.reports) from None


# Full-snapshot tables are comparable batch to batch; event tables are incremental (a day's
# events vs a 180-day backfill), so a volume rule on them would reject every normal batch.
_SNAPSHOT_TABLES = ("customers", "contacts", "consent", "channels", "coupons", "products")


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


#: Feedback events the response features count (``delivered`` is a message that reached the customer).
_CAMPAIGN_EVENTS = CAMPAIGN_KINDS


def read_history(
    engine: Engine, as_of: datetime, customer_ids: list[str] | None = None, *, events: bool = True
) -> dict[str, pd.DataFrame]:
    """Read customers, consent, events, orders and campaign messages and responses before ``as_of``.

    Args:
        engine: The warehouse.
        as_of: The point in time; rows at or after it are not read.
        customer_ids: Only these customers' rows (one scoring shard); all customers when ``None``.
        events: Read the events table too (features aggregate the event store instead).
    """
    tables = {
        "customers": (select(m.Customer), m.Customer.customer_id),
        # Each (customer, channel)'s latest consent event before as_of, not the whole history.
        "consent": (q.consent_state_query(as_of, inclusive=False), m.Consent.customer_id),
        "events": (select(m.Event).where(m.Event.ts < as_of), m.Event.customer_id),
        "orders": (select(m.Order).where(m.Order.ts < as_of), m.Order.customer_id),
        # The shop's own campaigns, as the channels reported them: messages delivered, and the
        # clicks and redemptions they got (the providers' times, not when the outbox sent them).
        "campaign": (
            select(m.FeedbackEvent.customer_id, m.FeedbackEvent.ts, m.FeedbackEvent.event_type.label("kind"))
            .where(m.FeedbackEvent.event_type.in_(_CAMPAIGN_EVENTS), m.FeedbackEvent.ts < as_of),
            m.FeedbackEvent.customer_id,
        ),
    }
    if not events:
        # Features: the events come from the event store, and build_features picks each channel's
        # latest consent itself (the plain range read is several times cheaper than the latest-row query).
        tables["events"] = (tables["events"][0].limit(0), None)
        tables["consent"] = (select(m.Consent).where(m.Consent.updated_at < as_of), m.Consent.customer_id)
    out: dict[str, pd.DataFrame] = {}
    plain = engine.dialect.name == "sqlite"
    read = _read_plain if plain else pd.read_sql
    with engine.connect() as conn:
        for name, (stmt, id_col) in tables.items():
            if plain:
                stmt = _times_as_text(stmt)
            if customer_ids is None or id_col is None:
                out[name] = read(stmt, conn)
                continue
            # Bounded IN lists: SQLite caps bound parameters, and PostgreSQL plans short lists well.
            parts = [
                read(stmt.where(id_col.in_(customer_ids[i : i + _ID_CHUNK])), conn)
                for i in range(0, len(customer_ids), _ID_CHUNK)
            ]
            out[name] = pd.concat(parts, ignore_index=True) if parts else read(stmt.limit(0), conn)
    for df in (out["events"], out["orders"], out["consent"], out["campaign"]):
        for col in ("ts", "updated_at"):
            if col in df.columns:
                df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
    if plain and len(out["customers"]):
        signup = out["customers"]["signup_date"]
        out["customers"]["signup_date"] = pd.to_datetime(signup, format="ISO8601").dt.date
    return out


def _read_plain(stmt, conn) -> pd.DataFrame:  # noqa: ANN001 - a Select of SQLite-stored columns
    """Read a SQLite query into a frame from the driver's rows, as :func:`pandas.read_sql` would.

    SQLAlchemy builds a Row per row and runs result processors, which costs as much as SQLite's
    own work; the times are selected as text already (:func:`_times_as_text`), so only booleans
    and decimals need the types pandas would give them.
    """
    result = conn.execute(stmt)
    try:
        rows = result.cursor.fetchall()  # the driver's tuples, no per-row processing
        frame = pd.DataFrame.from_records(rows, columns=list(result.keys()), coerce_float=True)
    finally:
        result.close()
    for column in stmt.selected_columns:
        if isinstance(column.type, Numeric) and column.key in frame:
            frame[column.key] = frame[column.key].astype(float)  # SQLite keeps 12.0 as 12
        elif isinstance(column.type, Boolean) and column.key in frame:
            values = frame[column.key]
            frame[column.key] = values.astype(bool) if values.notna().all() else values.map(
                lambda v: None if v is None or v != v else bool(v))
    return frame


def _times_as_text(stmt):  # noqa: ANN001, ANN202 - a Select and the same Select
    """Select SQLite's date and time columns as their stored text, for pandas to parse in one go.

    SQLAlchemy parses each SQLite timestamp string in Python, which costs more than the whole
    query; :func:`pandas.to_datetime` parses a column of them vectorised.
    """
    columns = [
        type_coerce(c, String).label(c.key) if isinstance(c.type, Date | DateTime) else c
        for c in stmt.selected_columns
    ]
    return stmt.with_only_columns(*columns, maintain_column_froms=True)


def event_summary(engine: Engine, as_of: datetime, customer_ids: list[str] | None = None) -> pd.DataFrame:
    """Aggregate the events before ``as_of`` per customer from the event store (see mlpkg.event_store).

    Falls back to the ``events`` table when the store does not cover the warehouse.
    """
    with session_scope(engine) as session:
        parts = event_store.listed_parts(session)
    if parts is None:
        parts = read_history(engine, as_of, customer_ids)["events"]
    return summarise_events(parts, pd.Timestamp(as_of), customer_ids)


def customer_features(engine: Engine, as_of: datetime, customer_ids: list[str] | None = None) -> pd.DataFrame:
    """Build the point-in-time feature table as of ``as_of`` of every customer, or of ``customer_ids``."""
    # DuckDB aggregates the events (releasing the GIL) while the small tables are read.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="event-summary") as pool:
        summary = pool.submit(event_summary, engine, as_of, customer_ids)
        hist = read_history(engine, as_of, customer_ids, events=False)
        events = summary.result()
    return build_features(
        hist["customers"], hist["events"], hist["orders"], pd.Timestamp(as_of), consent=hist["consent"],
        event_summary=events, campaign_history=hist["campaign"],
    )


def training_frame(engine: Engine, log_names: list[str] | None = None) -> pd.DataFrame:
    """Join campaign-log rows with features as of each log's send time.

    Returns:
        The model input frame: customer_id, feature columns, arm, converted, revenue, propensity,
        log_name and redeemed (0/1 where the log records it, else NaN).
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
        # The shop's own logs record whether a conversion redeemed the coupon (its cost); others: NaN.
        redeemed = pd.Series([o.get("redeemed") if isinstance(o, dict) else None for o in rows["outcomes"]])
        frame = rows[["customer_id", "converted", "revenue", "propensity"]].assign(
            arm=arm, log_name=log.name, redeemed=pd.to_numeric(redeemed, errors="coerce").to_numpy()
        )
        out.append(frame.merge(feats, on="customer_id", how="inner"))
    return pd.concat(out, ignore_index=True)
