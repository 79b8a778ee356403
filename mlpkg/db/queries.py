"""All warehouse SQL: small functions that take a session and speak in plain values.

Writes are upserts keyed by natural keys (primary keys of the models), so a re-run of any
stage rewrites the same rows instead of adding new ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import Select, and_, delete, func, insert, literal, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from mlpkg.db import models as m

_CHUNK = 5_000


def _insert_for(session: Session, model: type[m.Base]):  # noqa: ANN202 - dialect-specific Insert
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model.__table__)
    if dialect == "sqlite":
        return sqlite.insert(model.__table__)
    raise ValueError(f"upserts are implemented for sqlite and postgresql, not {dialect!r}")


def upsert_rows(
    session: Session,
    model: type[m.Base],
    rows: Sequence[Mapping[str, Any]],
    *,
    update_existing: bool = True,
) -> int:
    """Insert ``rows`` into ``model``'s table; on a primary-key clash update (or keep) the row.

    The statement is compiled once and executed with the rows as parameter sets (SQLAlchemy's
    "insertmanyvalues" batches them into multi-row INSERTs), instead of compiling one statement
    with every value inlined, which costs more than the database's work.

    Returns:
        The number of rows handed to the database.
    """
    if not rows:
        return 0
    keys = [c.name for c in model.__table__.primary_key.columns]
    columns = list(rows[0].keys())
    stmt = _insert_for(session, model)
    update_cols = [c for c in columns if c not in keys]
    if update_existing and update_cols:
        stmt = stmt.on_conflict_do_update(
            index_elements=keys, set_={c: getattr(stmt.excluded, c) for c in update_cols}
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=keys)
    conn = session.connection()
    for start in range(0, len(rows), _CHUNK):
        conn.execute(stmt, [dict(r) for r in rows[start : start + _CHUNK]])
    return len(rows)


def file_sha256(path) -> str:  # noqa: ANN001 - str or Path
    """Return the SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_file_ingested(session: Session, sha256: str, table: str) -> bool:
    """Tell whether a file with this checksum was already loaded into ``table``."""
    return session.get(m.IngestedFile, (sha256, table)) is not None


def record_ingested_file(
    session: Session, *, sha256: str, table: str, batch: str, file_name: str, rows: int, now: datetime
) -> None:
    """Remember a loaded file so loading it again is a no-op."""
    upsert_rows(
        session,
        m.IngestedFile,
        [dict(sha256=sha256, table_name=table, batch=batch, file_name=file_name, rows=rows, loaded_at=now)],
        update_existing=False,
    )


def as_utc(value) -> pd.Timestamp:  # noqa: ANN001 - datetime, str or Timestamp
    """Return a UTC timestamp; naive values (SQLite drops time zones) are taken as UTC."""
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def table_counts(session: Session) -> dict[str, int]:
    """Count the rows of every warehouse table."""
    return {
        name: session.execute(select(func.count()).select_from(table)).scalar_one()
        for name, table in m.Base.metadata.tables.items()
    }


def table_checksums(session: Session) -> dict[str, str]:
    """Return an order-independent checksum of every table's contents (for "nothing changed" checks)."""
    sums: dict[str, str] = {}
    for name, table in m.Base.metadata.tables.items():
        pk = list(table.primary_key.columns)
        rows = session.execute(select(table).order_by(*pk)).all()
        digest = hashlib.sha256()
        for row in rows:
            digest.update(repr(tuple(row)).encode())
        sums[name] = digest.hexdigest()
    return sums


def known_ids(session: Session, column) -> set[str]:  # noqa: ANN001 - an ORM attribute
    """Return the set of values of an id column (for referential checks)."""
    return set(session.execute(select(column)).scalars())


def latest_ts(session: Session, column) -> datetime | None:  # noqa: ANN001 - an ORM attribute
    """Return the largest timestamp in a column, or None for an empty table."""
    return session.execute(select(func.max(column))).scalar_one_or_none()


# --- campaigns and the ledger -------------------------------------------------------------------


def get_campaign(session: Session, campaign_id: str) -> m.Campaign | None:
    """Return one campaign or None."""
    return session.get(m.Campaign, campaign_id)


def claim_campaign(
    session: Session,
    *,
    campaign_id: str,
    run_key: str,
    owner: str,
    as_of: datetime,
    budget: float,
    objective: str,
    now: datetime,
) -> str:
    """Create or lock a campaign row for one allocation run.

    Returns:
        ``"new"`` when this run may allocate, ``"done"`` when the same run already allocated
        (an idempotent re-run), and raises ``CampaignBusyError`` when another run holds it.
    """
    existing = session.get(m.Campaign, campaign_id, with_for_update=True)
    if existing is None:
        session.add(
            m.Campaign(
                campaign_id=campaign_id,
                created_at=now,
                as_of=as_of,
                budget=budget,
                committed=0.0,
                objective=objective,
                status="allocating",
                run_key=run_key,
                lock_owner=owner,
                summary={},
            )
        )
        try:
            session.flush()
        except IntegrityError as exc:
            # Another run inserted the same campaign between our read and our insert.
            raise CampaignBusyError(
                f"campaign {campaign_id!r} was created concurrently by another run; {owner!r} refuses to "
                "allocate it twice"
            ) from exc
        return "new"
    if existing.status != "allocating":
        if existing.run_key != run_key:
            raise CampaignBusyError(
                f"campaign {campaign_id!r} was already allocated by run {existing.run_key!r}; "
                f"run {run_key!r} will not allocate it again (use a new campaign id)"
            )
        return "done"
    if existing.lock_owner not in (None, owner):
        raise CampaignBusyError(
            f"campaign {campaign_id!r} is being allocated by {existing.lock_owner!r} right now; "
            f"{owner!r} refuses to run concurrently"
        )
    existing.lock_owner = owner
    existing.run_key = run_key
    return "new"


class CampaignBusyError(RuntimeError):
    """Another run holds the campaign, or it was allocated by a different run."""


def commit_spend(session: Session, campaign_id: str, amount: float) -> None:
    """Add expected spend to a campaign; the database's CHECK rejects any overspend."""
    session.execute(
        update(m.Campaign)
        .where(m.Campaign.campaign_id == campaign_id)
        .values(committed=m.Campaign.committed + amount)
    )


def issue_coupons(session: Session, counts: Mapping[str, int]) -> None:
    """Count issued coupons; the database's CHECK rejects issuing beyond inventory.

    Rows are updated in coupon-id order: two campaigns written at once then lock the coupons
    they share in the same order, so one waits for the other instead of deadlocking.
    """
    for coupon_id, n in sorted(counts.items()):
        if n:
            session.execute(
                update(m.Coupon)
                .where(m.Coupon.coupon_id == coupon_id)
                .values(issued=m.Coupon.issued + int(n))
            )


def customers_on_cooldown(session: Session, since: datetime, until: datetime | None = None) -> set[str]:
    """Customers given a coupon by a campaign dated in ``(since, until)`` (campaign time, not wall time).

    ``since`` is exclusive: with a 14-day cooldown, a coupon from exactly 14 days ago has cooled
    down, so weekly campaigns block a customer for one round after a coupon, not two.
    """
    stmt = (
        select(m.Allocation.customer_id)
        .join(m.Campaign, m.Campaign.campaign_id == m.Allocation.campaign_id)
        .where(m.Campaign.as_of > since, m.Allocation.coupon_id.is_not(None))
    )
    if until is not None:
        stmt = stmt.where(m.Campaign.as_of < until)
    return set(session.execute(stmt).scalars())


def record_promotion(
    session: Session,
    *,
    model_name: str,
    alias: str,
    version: str,
    previous_version: str | None,
    actor: str,
    reason: str,
    details: Mapping[str, Any],
    now: datetime,
) -> None:
    """Record one alias move (who, why, when)."""
    session.add(
        m.ModelPromotion(
            model_name=model_name,
            alias=alias,
            version=version,
            previous_version=previous_version,
            actor=actor,
            reason=reason,
            details=dict(details),
            created_at=now,
        )
    )


def promotion_history(
    session: Session, model_name: str | None = None, limit: int = 50
) -> list[m.ModelPromotion]:
    """Return the latest alias moves, newest first."""
    stmt = select(m.ModelPromotion).order_by(m.ModelPromotion.id.desc()).limit(limit)
    if model_name:
        stmt = stmt.where(m.ModelPromotion.model_name == model_name)
    return list(session.execute(stmt).scalars())


def campaigns(session: Session, limit: int = 50) -> list[m.Campaign]:
    """Return the latest campaigns, newest first."""
    return list(
        session.execute(select(m.Campaign).order_by(m.Campaign.created_at.desc()).limit(limit)).scalars()
    )


def measured_campaign_summaries(
    session: Session, *, before: datetime | None = None, limit: int = 4
) -> list[tuple[str, dict]]:
    """Return ``(campaign_id, summary)`` of the ``limit`` newest measured campaigns sent before ``before``."""
    stmt = select(m.Campaign.campaign_id, m.Campaign.summary).where(m.Campaign.status == "measured")
    if before is not None:
        stmt = stmt.where(m.Campaign.as_of < before)
    rows = session.execute(stmt.order_by(m.Campaign.as_of.desc()).limit(limit)).all()
    return [(str(cid), dict(summary or {})) for cid, summary in rows]


def delete_rows(session: Session, model: type[m.Base], **where: Any) -> int:
    """Delete rows matching equality filters (used to replace a stage's own output)."""
    stmt = model.__table__.delete()
    for col, val in where.items():
        stmt = stmt.where(getattr(model, col) == val)
    return session.execute(stmt).rowcount or 0


def ping(session: Session) -> bool:
    """Check the warehouse answers."""
    return session.execute(text("SELECT 1")).scalar_one() == 1


def ids_in(values: Iterable[str]) -> list[str]:
    """Return a de-duplicated, sorted list of ids (stable order for queries and hashes)."""
    return sorted(set(values))


def feedback_event_count(session: Session, campaign_id: str) -> int:
    """Count the feedback events stored for a campaign (late arrivals raise it)."""
    return int(
        session.execute(
            select(func.count())
            .select_from(m.FeedbackEvent)
            .where(m.FeedbackEvent.campaign_id == campaign_id)
        ).scalar_one()
    )


def send_span(session: Session, campaign_id: str) -> tuple[datetime | None, datetime | None]:
    """Return the wall-clock times of a campaign's first and last sent messages (None, None if none)."""
    first, last = session.execute(
        select(func.min(m.Delivery.sent_at), func.max(m.Delivery.sent_at)).where(
            m.Delivery.campaign_id == campaign_id, m.Delivery.status == "sent"
        )
    ).one()
    return first, last


def handled_drop_ids(session: Session, kind: str) -> set[str]:
    """Return the ids of the landing-zone drops of one kind already loaded or quarantined."""
    return set(session.execute(select(m.LandedBatch.drop_id).where(m.LandedBatch.kind == kind)).scalars())


def record_landed_drop(
    session: Session,
    *,
    kind: str,
    drop_id: str,
    url: str,
    exported_at: datetime,
    status: str,
    detail: dict,
    now: datetime,
) -> None:
    """Record that a landing-zone drop was handled (``loaded`` or ``quarantined``)."""
    session.add(
        m.LandedBatch(
            kind=kind,
            drop_id=drop_id,
            url=url,
            exported_at=exported_at,
            status=status,
            handled_at=now,
            detail=detail,
        )
    )


def newest_export(
    session: Session, *, kind: str | None = None, handled_after: datetime | None = None
) -> datetime | None:
    """Return the export time of the newest loaded drop (of one kind, loaded after a moment), or None."""
    stmt = select(func.max(m.LandedBatch.exported_at)).where(m.LandedBatch.status == "loaded")
    if kind is not None:
        stmt = stmt.where(m.LandedBatch.kind == kind)
    if handled_after is not None:
        stmt = stmt.where(m.LandedBatch.handled_at >= handled_after)
    value = session.execute(stmt).scalar_one_or_none()
    return None if value is None else as_utc(value).to_pydatetime()


# The contact column that reaches a customer on each channel.
CONTACT_COLUMN_OF_CHANNEL = {"email": "email", "sms": "phone", "push": "push_token"}


def reachable_customers(session: Session) -> dict[str, set[str]]:
    """Return, per channel, the ids of the customers with a contact on it (ids only, never addresses)."""
    out: dict[str, set[str]] = {}
    for channel, column in CONTACT_COLUMN_OF_CHANNEL.items():
        attr = getattr(m.Contact, column)
        out[channel] = set(session.execute(select(m.Contact.customer_id).where(attr.is_not(None))).scalars())
    return out


# --- consent: an event history, read as of a time -----------------------------------------------


def record_consent_events(session: Session, rows: Sequence[Mapping[str, Any]]) -> int:
    """Add consent events to the history; an event already there is kept, an opt-out always wins.

    Events are keyed by (customer_id, channel, updated_at), so arrival order never matters: an
    older opt-in that arrives after a newer opt-out is stored as the older event it is. Two
    events with the same key that disagree (in one call or across calls) become one opt-out,
    whichever arrived first.

    Args:
        session: Open session; the caller commits.
        rows: ``customer_id``, ``channel``, ``opted_in`` and ``updated_at`` (any time zone; naive
            values are taken as UTC, and every timestamp is stored in UTC).

    Returns:
        The number of distinct events handed to the database.
    """
    events: dict[tuple[str, str, datetime], bool] = {}
    for row in rows:
        key = (str(row["customer_id"]), str(row["channel"]), as_utc(row["updated_at"]).to_pydatetime())
        # PostgreSQL refuses to update one row twice in a statement: collapse the key here first.
        events[key] = events.get(key, True) and bool(row["opted_in"])
    values = [
        {"customer_id": c, "channel": ch, "updated_at": ts, "opted_in": opted}
        for (c, ch, ts), opted in sorted(events.items())
    ]
    table = m.Consent.__table__
    stmt = _insert_for(session, m.Consent)
    stmt = stmt.on_conflict_do_update(
        index_elements=["customer_id", "channel", "updated_at"],
        set_={"opted_in": and_(table.c.opted_in, stmt.excluded.opted_in)},
    )
    # One compiled statement, the rows as parameter sets (not one statement with every value inlined).
    conn = session.connection()
    for start in range(0, len(values), _CHUNK):
        conn.execute(stmt, values[start : start + _CHUNK])
    return len(values)


def consent_state_query(as_of: datetime, *, inclusive: bool = True) -> Select:
    """Return a SELECT of every (customer, channel)'s latest consent event as of ``as_of``.

    Args:
        as_of: The point in time (naive values are UTC).
        inclusive: Count an event dated exactly ``as_of`` (True, the state at a send time) or
            only events strictly before it (False, point-in-time features).

    Returns:
        A select of :class:`~mlpkg.db.models.Consent` rows, at most one per customer and channel:
        the latest event in the window, an opt-out where an opt-in shares its instant.
    """
    cutoff = as_utc(as_of).to_pydatetime()
    newer = aliased(m.Consent)

    def within(column):  # noqa: ANN001, ANN202 - a timestamp column and its SQL condition
        return column <= cutoff if inclusive else column < cutoff

    superseded = (
        select(newer.customer_id)
        .where(
            newer.customer_id == m.Consent.customer_id,
            newer.channel == m.Consent.channel,
            within(newer.updated_at),
            or_(
                newer.updated_at > m.Consent.updated_at,
                and_(
                    newer.updated_at == m.Consent.updated_at,
                    newer.opted_in.is_(False),
                    m.Consent.opted_in.is_(True),
                ),
            ),
        )
        .exists()
    )
    return select(m.Consent).where(within(m.Consent.updated_at), ~superseded)


def consent_as_of(session: Session, as_of: datetime) -> dict[str, set[str]]:
    """Return, per channel, the customers opted in as of ``as_of``.

    A customer counts as opted in when their latest consent event on the channel dated at or
    before ``as_of`` is an opt-in (an opt-out at the same instant wins). Events after ``as_of``
    are ignored, however early they arrived; a customer without an event counts as opted out.

    Args:
        session: Open session.
        as_of: The time the consent must hold at (a campaign's as-of, a message's send time).

    Returns:
        Customer ids keyed by channel; a channel where nobody is opted in is absent.
    """
    stmt = (
        consent_state_query(as_of)
        .where(m.Consent.opted_in.is_(True))
        .with_only_columns(m.Consent.channel, m.Consent.customer_id)
    )
    out: dict[str, set[str]] = {}
    for channel, customer_id in session.execute(stmt):
        out.setdefault(channel, set()).add(customer_id)
    return out


# --- what a load would change: stored rows, campaign ledgers, log owners ----------------------------


def rows_by_key(
    session: Session,
    model: type[m.Base],
    columns: Sequence[str],
    keys: Iterable[Any],
    *,
    key_column: str,
    where: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Return the stored rows whose ``key_column`` is one of ``keys`` (chunked IN lists).

    Args:
        session: An open session.
        model: The table.
        columns: Columns to return (the key column is always included).
        keys: Key values to look up.
        key_column: Column the keys are compared with.
        where: Extra equality filters (e.g. the log name of campaign-log rows).

    Returns:
        One dict per stored row; keys without a stored row are absent.
    """
    cols = [getattr(model, c) for c in dict.fromkeys([key_column, *columns])]
    values = ids_in(keys)
    out: list[dict[str, Any]] = []
    for start in range(0, len(values), _CHUNK):
        stmt = select(*cols).where(getattr(model, key_column).in_(values[start : start + _CHUNK]))
        for col, val in (where or {}).items():
            stmt = stmt.where(getattr(model, col) == val)
        out += [dict(r._mapping) for r in session.execute(stmt)]
    return out


def campaign_send_times(session: Session) -> dict[str, datetime]:
    """Return every campaign's id and point in time (its send, ``as_of``)."""
    return {cid: as_of for cid, as_of in session.execute(select(m.Campaign.campaign_id, m.Campaign.as_of))}


def campaign_ledger_rows(session: Session, campaign_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Return the allocation ledger of some campaigns with whether each customer was sent a message.

    Returns:
        Dicts with ``campaign_id``, ``customer_id``, ``coupon_id`` (None for control) and ``delivered``.
    """
    ids = ids_in(campaign_ids)
    if not ids:
        return []
    ledger = session.execute(
        select(m.Allocation.campaign_id, m.Allocation.customer_id, m.Allocation.coupon_id).where(
            m.Allocation.campaign_id.in_(ids)
        )
    ).all()
    sent = set(
        session.execute(
            select(m.Delivery.campaign_id, m.Delivery.customer_id).where(
                m.Delivery.campaign_id.in_(ids), m.Delivery.status == "sent"
            )
        ).all()
    )
    return [
        dict(campaign_id=c, customer_id=u, coupon_id=k, delivered=(c, u) in sent) for c, u, k in ledger
    ]


def order_facts(session: Session, order_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Return what the warehouse already holds about some order ids (shop orders and feedback orders).

    Returns:
        Dicts with ``order_id``, ``customer_id``, ``revenue`` and ``stored_in`` (the table).
    """
    ids = ids_in(order_ids)
    out: list[dict[str, Any]] = []
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        for oid, cid, rev in session.execute(
            select(m.Order.order_id, m.Order.customer_id, m.Order.revenue).where(m.Order.order_id.in_(chunk))
        ):
            out.append(dict(order_id=oid, customer_id=cid, revenue=rev, stored_in="orders"))
        for oid, cid, rev in session.execute(
            select(m.FeedbackEvent.order_id, m.FeedbackEvent.customer_id, m.FeedbackEvent.revenue).where(
                m.FeedbackEvent.order_id.in_(chunk), m.FeedbackEvent.event_type == "order"
            )
        ):
            out.append(dict(order_id=oid, customer_id=cid, revenue=rev, stored_in="feedback_events"))
    return out


def campaign_log_owners(session: Session) -> dict[str, str]:
    """Return each stored campaign log's name and the kind of source that owns it.

    Returns:
        ``name -> kind``: ``"shop-export"`` (a shop batch), ``"couponops-campaign"`` (a measured
        campaign) or ``"import"`` (``couponops import-log``).
    """
    rows = session.execute(select(m.CampaignLog.name, m.CampaignLog.spec)).all()
    return {name: str((spec or {}).get("format", "import")) for name, spec in rows}


def update_rows(session: Session, model: type[m.Base], rows: Sequence[Mapping[str, Any]]) -> int:
    """Overwrite existing rows by primary key (an explicit correction); returns the rows handed over."""
    if not rows:
        return 0
    keys = [c.name for c in model.__table__.primary_key.columns]
    for row in rows:
        stmt = update(model).values({c: v for c, v in row.items() if c not in keys})
        for k in keys:
            stmt = stmt.where(getattr(model, k) == row[k])
        session.execute(stmt)
    return len(rows)


def count_log_rows(session: Session, log_name: str) -> int:
    """Count the stored rows of one campaign log."""
    return int(
        session.execute(
            select(func.count()).select_from(m.CampaignLogRow).where(m.CampaignLogRow.log_name == log_name)
        ).scalar_one()
    )


# --- the Campaigns view (read only) ---------------------------------------------------------------------


def campaign_run_rows(session: Session, limit: int = 100) -> list[dict[str, Any]]:
    """Return the latest campaigns, newest first, with the number of messages actually sent.

    Returns:
        One plain dict per campaign: its columns (``summary`` excluded) and ``sent``.
    """
    sent = (
        select(m.Delivery.campaign_id, func.count().label("sent"))
        .where(m.Delivery.status == "sent")
        .group_by(m.Delivery.campaign_id)
        .subquery()
    )
    stmt = (
        select(m.Campaign, func.coalesce(sent.c.sent, 0))
        .outerjoin(sent, sent.c.campaign_id == m.Campaign.campaign_id)
        .order_by(m.Campaign.created_at.desc(), m.Campaign.campaign_id.desc())
        .limit(limit)
    )
    columns = [c.name for c in m.Campaign.__table__.columns if c.name not in ("summary", "lock_owner")]
    return [
        {**{c: getattr(campaign, c) for c in columns}, "sent": int(n)}
        for campaign, n in session.execute(stmt).all()
    ]


def overall_campaign_metrics(session: Session, campaign_ids: Iterable[str]) -> dict[str, dict[str, dict]]:
    """Return the ``overall`` measurements of campaigns: ``campaign_id -> group -> metrics``."""
    ids = list(campaign_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(m.CampaignMetric.campaign_id, m.CampaignMetric.breakdown_value, m.CampaignMetric.metrics)
        .where(m.CampaignMetric.breakdown == "overall", m.CampaignMetric.campaign_id.in_(ids))
    ).all()
    out: dict[str, dict[str, dict]] = {}
    for campaign_id, group, metrics in rows:
        out.setdefault(campaign_id, {})[group] = dict(metrics or {})
    return out


def current_aliases(session: Session) -> dict[tuple[str, str], str]:
    """Return where each alias points after its latest recorded move: ``(model, alias) -> version``."""
    latest = (
        select(func.max(m.ModelPromotion.id))
        .group_by(m.ModelPromotion.model_name, m.ModelPromotion.alias)
        .scalar_subquery()
    )
    rows = session.execute(
        select(m.ModelPromotion.model_name, m.ModelPromotion.alias, m.ModelPromotion.version).where(
            m.ModelPromotion.id.in_(latest)
        )
    ).all()
    return {(name, alias): version for name, alias, version in rows}


def training_runs_of_versions(session: Session, model_name: str, versions: Iterable[str]) -> dict[str, str]:
    """Return the MLflow run that trained each registered version: ``version -> mlflow_run_id``."""
    wanted = [v for v in set(versions) if v]
    if not wanted:
        return {}
    rows = session.execute(
        select(m.TrainingRun.model_version, m.TrainingRun.mlflow_run_id)
        .where(m.TrainingRun.model_name == model_name, m.TrainingRun.model_version.in_(wanted))
        .order_by(m.TrainingRun.trained_at)
    ).all()
    return {version: run_id for version, run_id in rows}


def batch_as_of(session: Session, *, as_of: datetime, loaded_by: datetime) -> str | None:
    """Return the newest shop batch a campaign saw: exported by its ``as_of``, else loaded by ``loaded_by``.

    Landing-zone drops carry their export time; a batch loaded by hand (``couponops ingest DIR``)
    only its load time.
    """
    landed = session.execute(
        select(m.LandedBatch.drop_id)
        .where(
            m.LandedBatch.kind == "batches",
            m.LandedBatch.status == "loaded",
            m.LandedBatch.exported_at <= as_of,
        )
        .order_by(m.LandedBatch.exported_at.desc())
        .limit(1)
    ).scalar_one_or_none()
    if landed is not None:
        return landed
    return session.execute(
        select(m.IngestedFile.batch)
        .where(m.IngestedFile.loaded_at <= loaded_by)
        .order_by(m.IngestedFile.loaded_at.desc())
        .limit(1)
    ).scalar_one_or_none()


# --- run history (read only: `couponops history` and `couponops report`) -------------------------------


def retrain_decisions(session: Session, limit: int = 50) -> list[m.RetrainDecision]:
    """Return the latest retraining decisions, newest first."""
    return list(
        session.execute(
            select(m.RetrainDecision).order_by(m.RetrainDecision.id.desc()).limit(limit)
        ).scalars()
    )


def trained_versions(session: Session, model_name: str) -> dict[str, tuple[datetime, str | None]]:
    """Return when and by which run each registered version was trained: ``version -> (trained_at, run_key)``.

    A version trained twice (a re-run) keeps its latest training.
    """
    rows = session.execute(
        select(m.TrainingRun.model_version, m.TrainingRun.trained_at, m.TrainingRun.run_key)
        .where(m.TrainingRun.model_name == model_name, m.TrainingRun.model_version.is_not(None))
        .order_by(m.TrainingRun.trained_at)
    ).all()
    return {version: (trained_at, run_key) for version, trained_at, run_key in rows}


def campaign_sent_count(session: Session, campaign_id: str) -> int:
    """Return how many of a campaign's messages were actually sent."""
    return int(
        session.execute(
            select(func.count())
            .select_from(m.Delivery)
            .where(m.Delivery.campaign_id == campaign_id, m.Delivery.status == "sent")
        ).scalar_one()
    )


def record_event_part(
    session: Session, *, sha256: str, path: str, rows: int, batch: str, now: datetime
) -> None:
    """List one Parquet part of the event store (in the load's transaction)."""
    row = dict(sha256=sha256, path=path, rows=rows, batch=batch, created_at=now)
    upsert_rows(session, m.EventPart, [row])


def event_part_paths(session: Session) -> list[str]:
    """Return the paths of every listed event-store part, oldest first."""
    stmt = select(m.EventPart.path).order_by(m.EventPart.created_at, m.EventPart.sha256)
    return list(session.execute(stmt).scalars())


def has_events(session: Session) -> bool:
    """Tell whether the warehouse holds any behaviour event."""
    return session.execute(select(m.Event.event_id).limit(1)).first() is not None


def sent_breakdown(session: Session, campaign_id: str) -> list[dict[str, Any]]:
    """Return what a campaign sent: customers and sent messages per coupon, channel and policy."""
    sent = (
        select(m.Delivery.customer_id)
        .where(m.Delivery.campaign_id == campaign_id, m.Delivery.status == "sent")
        .subquery()
    )
    stmt = (
        select(
            m.Allocation.coupon_id,
            m.Allocation.channel,
            m.Allocation.policy,
            func.count().label("customers"),
            func.count(sent.c.customer_id).label("sent"),
        )
        .outerjoin(sent, sent.c.customer_id == m.Allocation.customer_id)
        .where(m.Allocation.campaign_id == campaign_id, m.Allocation.coupon_id.is_not(None))
        .group_by(m.Allocation.coupon_id, m.Allocation.channel, m.Allocation.policy)
        .order_by(m.Allocation.policy, func.count().desc())
    )
    return [dict(r._mapping) for r in session.execute(stmt)]


def measured_at(session: Session, campaign_id: str) -> datetime | None:
    """Return when a campaign's metrics were last computed (``None`` if never)."""
    stmt = select(func.max(m.CampaignMetric.computed_at)).where(m.CampaignMetric.campaign_id == campaign_id)
    return session.execute(stmt).scalar_one_or_none()



# --- privacy: forget a customer, purge old behaviour ---------------------------------------------------


def forgotten_pseudonyms(session: Session, among: Iterable[str] | None = None) -> set[str]:
    """Return the pseudonyms of forgotten customers (their tombstones in ``privacy_audit``)."""
    stmt = select(m.PrivacyAudit.pseudonym).where(
        m.PrivacyAudit.action == "forget", m.PrivacyAudit.pseudonym.is_not(None)
    )
    if among is not None:
        stmt = stmt.where(m.PrivacyAudit.pseudonym.in_(list(among)))
    return set(session.execute(stmt).scalars())


def customer_exists(session: Session, customer_id: str) -> bool:
    """Tell whether the warehouse holds a customer row with this (pseudonymous) id."""
    return session.get(m.Customer, customer_id) is not None


def delete_customer_personal_rows(session: Session, customer_id: str) -> dict[str, int]:
    """Delete one customer's contacts, consent, events, orders, recommendations and customer row."""
    out = {}
    for name, model in (
        ("contacts", m.Contact),
        ("consent", m.Consent),
        ("events", m.Event),
        ("orders", m.Order),
        # Ranked from their behaviour, so personal data too.
        ("recommendations", m.Recommendation),
        ("customers", m.Customer),
    ):
        stmt = model.__table__.delete().where(model.customer_id == customer_id)
        out[name] = session.execute(stmt).rowcount or 0
    return out


def rename_customer_in_ledger(session: Session, customer_id: str, new_id: str) -> dict[str, int]:
    """Replace a customer id by ``new_id`` in the rows the ledger keeps; return the rows changed per table.

    Allocations, feedback events and campaign-log rows change their ``customer_id``; deliveries
    also their ``dedup_key`` and the id in their payload.
    """
    out = {}
    for name, model in (
        ("allocations", m.Allocation),
        ("feedback_events", m.FeedbackEvent),
        ("campaign_log_rows", m.CampaignLogRow),
    ):
        stmt = update(model).where(model.customer_id == customer_id).values(customer_id=new_id)
        out[name] = session.execute(stmt.execution_options(synchronize_session=False)).rowcount or 0
    # A reason keeps the campaign's side (binding constraint, runner-up, margin); its feature
    # attributions describe the person and go.
    reasons = m.AllocationReason
    stmt = update(reasons).where(reasons.customer_id == customer_id)
    stmt = stmt.values(customer_id=new_id, attributions=[]).execution_options(synchronize_session=False)
    out["allocation_reasons"] = session.execute(stmt).rowcount or 0
    deliveries = session.scalars(select(m.Delivery).where(m.Delivery.customer_id == customer_id)).all()
    for d in deliveries:
        d.customer_id = new_id
        d.dedup_key = d.dedup_key.replace(f":{customer_id}:", f":{new_id}:")
        d.payload = {**(d.payload or {}), "customer_id": new_id}
    session.flush()
    out["deliveries"] = len(deliveries)
    return out


def record_privacy_audit(
    session: Session, *, action: str, pseudonym: str | None, actor: str, reason: str, details: dict,
    now: datetime,
) -> None:
    """Add one ``privacy_audit`` row."""
    session.add(m.PrivacyAudit(action=action, pseudonym=pseudonym, actor=actor, reason=reason,
                               details=details, created_at=now))
    session.flush()


def privacy_audit_rows(session: Session, limit: int = 50) -> list[m.PrivacyAudit]:
    """Return the latest privacy operations, newest first."""
    stmt = select(m.PrivacyAudit).order_by(m.PrivacyAudit.created_at.desc(), m.PrivacyAudit.id.desc())
    return list(session.scalars(stmt.limit(limit)))


def delete_events_before(session: Session, cutoff: datetime) -> int:
    """Delete the behaviour events stamped before ``cutoff``; return how many."""
    return session.execute(m.Event.__table__.delete().where(m.Event.ts < cutoff)).rowcount or 0


def update_event_part_rows(session: Session, path: str, rows: int) -> None:
    """Set the row count of a rewritten event-store part (unlist it when it holds none)."""
    table = m.EventPart.__table__
    if rows:
        session.execute(update(table).where(table.c.path == path).values(rows=rows))
    else:
        session.execute(table.delete().where(table.c.path == path))


def contact_of(session: Session, customer_id: str) -> m.Contact | None:
    """Return one customer's contact row (delivery reads addresses only at send time)."""
    return session.get(m.Contact, customer_id)


def checkpoint_wal(session: Session) -> None:
    """On SQLite, copy the write-ahead log into the database and truncate it (old page images go)."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))


def customer_attributes(
    session: Session, columns: Sequence[str], customer_ids: Iterable[str] | None = None
) -> pd.DataFrame:
    """Return ``customer_id`` and the given ``customers`` columns (e.g. region, device), as text.

    Args:
        session: an open session.
        columns: names of ``customers`` columns (the declared sensitive attributes).
        customer_ids: only these customers (all when None).
    """
    attrs = [getattr(m.Customer, c) for c in columns]
    stmt = select(m.Customer.customer_id, *attrs)
    rows = session.execute(stmt).all()
    df = pd.DataFrame(rows, columns=["customer_id", *columns]).astype(str)
    if customer_ids is not None:
        df = df[df["customer_id"].isin(set(customer_ids))]
    return df.reset_index(drop=True)


def allocation_reason(session: Session, campaign_id: str, customer_id: str) -> dict[str, Any] | None:
    """Return one ledger row with its reason (``None`` when the campaign has no row for the customer).

    Returns:
        The ledger's columns (arm, policy, propensity, model arm, expected cost, value, uplift) and
        under ``reason`` the ``allocation_reasons`` row (``None`` for a campaign allocated before
        reasons were recorded).
    """
    row = session.get(m.Allocation, (campaign_id, customer_id))
    if row is None:
        return None
    reason = session.get(m.AllocationReason, (campaign_id, customer_id))
    ledger = {c.name: getattr(row, c.name) for c in m.Allocation.__table__.columns}
    own = ("campaign_id", "customer_id")
    keys = [c.name for c in m.AllocationReason.__table__.columns if c.name not in own]
    ledger["reason"] = None if reason is None else {k: getattr(reason, k) for k in keys}
    return ledger


def reason_counts(session: Session, campaign_id: str) -> dict[str, int]:
    """Return how many ledger rows of a campaign each binding reason decided."""
    stmt = (
        select(m.AllocationReason.binding, func.count())
        .where(m.AllocationReason.campaign_id == campaign_id)
        .group_by(m.AllocationReason.binding)
    )
    return {code: int(n) for code, n in session.execute(stmt).all()}


# --- products and recommendations -------------------------------------------------------------------


def product_interactions(
    session: Session, before: datetime, since: datetime | None = None
) -> list[tuple[str, str, str, datetime]]:
    """Return ``(customer_id, product_id, kind, ts)`` of every event and order about a product.

    Point in time: only rows strictly before ``before`` (and at or after ``since`` when given).
    ``kind`` is the event type, or ``order`` for an order's product.
    """
    ev = select(m.Event.customer_id, m.Event.product_id, m.Event.event_type, m.Event.ts).where(
        m.Event.product_id.is_not(None), m.Event.ts < before
    )
    od = select(m.Order.customer_id, m.Order.product_id, literal("order"), m.Order.ts).where(
        m.Order.product_id.is_not(None), m.Order.ts < before
    )
    if since is not None:
        ev = ev.where(m.Event.ts >= since)
        od = od.where(m.Order.ts >= since)
    return [tuple(r) for r in session.execute(ev).all()] + [tuple(r) for r in session.execute(od).all()]


def has_products(session: Session) -> bool:
    """Return whether the warehouse holds a product catalogue (a shop without one sends no products)."""
    return session.scalar(select(m.Product.product_id).limit(1)) is not None


def product_catalogue(session: Session) -> list[dict[str, Any]]:
    """Return every product: ``product_id, category, price, in_stock``, ordered by id."""
    rows = session.execute(select(m.Product).order_by(m.Product.product_id)).scalars()
    return [
        {"product_id": p.product_id, "category": p.category, "price": float(p.price),
         "in_stock": bool(p.in_stock)}
        for p in rows
    ]


def replace_recommendations(session: Session, campaign_id: str, rows: Sequence[Mapping[str, Any]]) -> int:
    """Write a campaign's recommendations, replacing any earlier ones (a re-run rewrites the same rows)."""
    session.execute(delete(m.Recommendation).where(m.Recommendation.campaign_id == campaign_id))
    if rows:
        session.execute(insert(m.Recommendation), [dict(r) for r in rows])
    return len(rows)


def recommendations_for(session: Session, campaign_id: str, customer_ids: Sequence[str] | None = None
                        ) -> dict[str, list[str]]:
    """Return each customer's recommended product ids for a campaign, best first."""
    stmt = select(m.Recommendation.customer_id, m.Recommendation.product_id).where(
        m.Recommendation.campaign_id == campaign_id
    )
    if customer_ids is not None:
        stmt = stmt.where(m.Recommendation.customer_id.in_(list(customer_ids)))
    out: dict[str, list[str]] = {}
    stmt = stmt.order_by(m.Recommendation.customer_id, m.Recommendation.rank)
    for customer, product in session.execute(stmt):
        out.setdefault(customer, []).append(product)
    return out


def campaign_customers(session: Session, campaign_id: str) -> list[str]:
    """Return the customers a campaign sends a coupon to (model and explore allocations), sorted."""
    stmt = select(m.Allocation.customer_id).where(
        m.Allocation.campaign_id == campaign_id,
        m.Allocation.policy.in_(("model", "explore")),
        m.Allocation.coupon_id.is_not(None),
    )
    return sorted(set(session.scalars(stmt)))
