"""Rules across the tables of a batch and across batches: references, time order, contradictions.

One file on its own can look fine and still be wrong against what the warehouse (or another file
of the same batch) already says: an order id sent again with another customer, a redemption of a
coupon the campaign never gave that customer, feedback dated before its campaign was sent. These
rules need the other frames of the batch and a read-only view of the warehouse
(:class:`~mlpkg.validation.contract.WarehouseView`); :func:`check_batch_references` returns their
failures per table, and the gate adds them to the table reports, so a refused batch is quarantined
with every reason in ``validation_result.json`` like any other contract failure.

Facts are immutable: a row whose natural key is stored already must carry the same values in the
columns of :data:`IMMUTABLE_COLUMNS` (an identical replay is a no-op). Only an order row flagged
``is_correction`` = 1 may change a stored order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mlpkg.validation.checks import sample_rows
from mlpkg.validation.contract import MAX_SAMPLE_ROWS, Failure, ValidationContext, plain_value
from mlpkg.validation.readers import RAW_SCHEMAS

#: Optional columns a raw table may carry beyond its declared ones (not reported as extra).
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {"orders": ("is_correction",)}
#: Column of ``orders`` that marks a row as a correction of a stored order.
CORRECTION_COLUMN = "is_correction"
#: Columns a later row for a stored key may not change. Snapshot tables keep their changing state
#: (coupon inventory and validity, a customer's segment) out of this list: a newer snapshot wins.
IMMUTABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "orders": ("customer_id", "ts", "revenue", "n_items", "coupon_id"),
    "events": ("customer_id", "ts", "event_type", "category"),
    "feedback": (
        "campaign_id",
        "customer_id",
        "event_type",
        "ts",
        "coupon_id",
        "channel",
        "order_id",
        "revenue",
    ),
    "customers": ("signup_date",),
    "coupons": ("kind", "face_value", "min_basket"),
    "campaign_log": ("arm", "propensity", "converted", "revenue"),
}
#: Earliest plausible ``valid_from`` of a coupon.
EARLIEST_COUPON_START = pd.Timestamp("2000-01-01", tz="UTC")
#: How far after ``now`` a coupon's ``valid_to`` may lie.
MAX_COUPON_YEARS_AHEAD = 5
#: Feedback events that need a message of the campaign sent to the customer.
_MESSAGE_EVENTS = ("delivered", "open", "click")
#: Campaign-log owner kind of a shop batch's logs.
SHOP_LOG_KIND = "shop-export"
_TRUE = {"1", "true", "yes"}
_FALSE = {"", "0", "false", "no"}


def _rows(df: pd.DataFrame, mask: Any, offset: int | None, columns: Sequence[str]) -> list[dict]:
    return sample_rows(
        df, np.asarray(mask, dtype=bool), line_offset=offset, columns=[c for c in columns if c in df.columns]
    )


def _where(row: Mapping[str, Any]) -> str:
    return f"line {row['_line']}" if "_line" in row else f"row {row['_row']}"


def correction_flags(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Return ``(is_correction as bool, mask of values that are not a 0/1 flag)`` of an orders frame."""
    if CORRECTION_COLUMN not in df.columns:
        false = pd.Series(False, index=df.index)
        return false, false
    text = df[CORRECTION_COLUMN].astype("str").str.strip().str.lower()
    text = text.where(df[CORRECTION_COLUMN].notna(), "")
    return text.isin(_TRUE), ~text.isin(_TRUE | _FALSE)


def _comparable(s: pd.Series, kind: str, column: str) -> pd.Series:
    """Return a column in a form where equal facts compare equal (UTC times, rounded numbers, text)."""
    if column == "signup_date":
        return pd.to_datetime(s, utc=True).dt.strftime("%Y-%m-%d")
    if kind in ("timestamp", "date"):
        return pd.to_datetime(s, utc=True, format="mixed").dt.strftime("%Y-%m-%dT%H:%M:%S.%f")
    if kind in ("float", "int", "flag"):
        return pd.to_numeric(s, errors="coerce").astype("float64").round(6).astype("str")
    return s.astype("object").where(s.notna(), "").astype("str")


def check_contradictions(
    df: pd.DataFrame, table: str, context: ValidationContext, line_offset: int | None = None
) -> list[Failure]:
    """Check that rows whose natural key is stored already repeat the stored values.

    Args:
        df: The batch frame of a raw table.
        table: Its name (tables without immutable columns pass).
        context: Must carry ``warehouse``; without it the check is skipped.
        line_offset: File line of data row 0.

    Returns:
        One failure per column that a later row would change, naming the key, both values and the
        line; order rows flagged ``is_correction`` are exempt (they are explicit corrections).
    """
    if context.warehouse is None or table not in IMMUTABLE_COLUMNS or df.empty:
        return []
    key = list(RAW_SCHEMAS[table].key)
    keys = list(df[key[0]]) if len(key) == 1 else list(df[key].itertuples(index=False, name=None))
    return contradictions_with(df, table, context.warehouse.stored_rows(table, keys), line_offset)


def contradictions_with(
    df: pd.DataFrame, table: str, stored: pd.DataFrame, line_offset: int | None = None
) -> list[Failure]:
    """Return the failures of rows of ``df`` that change a row of ``stored`` (see check_contradictions)."""
    if stored.empty or table not in IMMUTABLE_COLUMNS:
        return []
    schema = RAW_SCHEMAS[table]
    key = list(schema.key)
    frame = df.assign(row_pos__=np.arange(len(df)))
    if table == "orders":
        frame = frame[~correction_flags(df)[0].to_numpy()]
    merged = frame.merge(stored, on=key, how="inner", suffixes=("", "__stored"))
    out = []
    for col in IMMUTABLE_COLUMNS[table]:
        if col not in df.columns or f"{col}__stored" not in merged.columns:
            continue
        kind = schema.column(col).kind
        new = _comparable(merged[col], kind, col)
        old = _comparable(merged[f"{col}__stored"], kind, col)
        differ = (new != old).to_numpy()
        if not differ.any():
            continue
        bad = merged[differ]
        rows = []
        for r in bad.head(MAX_SAMPLE_ROWS).itertuples(index=False):
            pos = int(r.row_pos__)
            row: dict[str, Any] = {"_row": pos}
            if line_offset is not None:
                row["_line"] = pos + line_offset
            row.update({k: plain_value(getattr(r, k)) for k in key})
            row.update(
                {
                    f"stored {col}": plain_value(getattr(r, f"{col}__stored")),
                    f"new {col}": plain_value(getattr(r, col)),
                }
            )
            rows.append(row)
        first = rows[0]
        ident = ", ".join(f"{k} {first[k]!r}" for k in key)
        hint = (
            f"; flag the row {CORRECTION_COLUMN}=1 to correct a stored order"
            if table == "orders"
            else "; stored facts are never overwritten"
        )
        out.append(
            Failure(
                "no_contradiction",
                col,
                f"{table} row with {ident} is already stored with {col} = "
                f"{first[f'stored {col}']!r}, this file has {first[f'new {col}']!r} ({_where(first)}){hint}",
                int(differ.sum()),
                rows,
            )
        )
    return out


def check_coupon_validity(
    df: pd.DataFrame, context: ValidationContext, line_offset: int | None = None
) -> list[Failure]:
    """Check that coupon validity lies in a sane window: from 2000 on, ending at most 5 years ahead."""
    if not {"valid_from", "valid_to"} <= set(df.columns):
        return []
    latest = pd.Timestamp(context.now) + pd.DateOffset(years=MAX_COUPON_YEARS_AHEAD)
    vf, vt = pd.to_datetime(df["valid_from"], utc=True), pd.to_datetime(df["valid_to"], utc=True)
    show = ["coupon_id", "valid_from", "valid_to"]
    out = []
    for mask, col, text in (
        (
            vf < EARLIEST_COUPON_START,
            "valid_from",
            f"valid_from must not be before {EARLIEST_COUPON_START.date()}",
        ),
        (
            vt > latest,
            "valid_to",
            f"valid_to must not be more than {MAX_COUPON_YEARS_AHEAD} years after now ({latest.date()})",
        ),
    ):
        if mask.any():
            rows = _rows(df, mask, line_offset, show)
            text += f"; e.g. coupon_id {rows[0]['coupon_id']!r} has {col} {rows[0][col]} ({_where(rows[0])})"
            out.append(Failure("coupon_validity_window", col, text, int(mask.sum()), rows))
    return out


def check_correction_flags(df: pd.DataFrame, line_offset: int | None = None) -> list[Failure]:
    """Check that an orders file's ``is_correction`` column holds only 0/1 (true/false) values."""
    _, bad = correction_flags(df)
    if not bad.any():
        return []
    rows = _rows(df, bad, line_offset, ["order_id", CORRECTION_COLUMN])
    return [
        Failure(
            "correction_flag",
            CORRECTION_COLUMN,
            f"{CORRECTION_COLUMN} must be 0 or 1 (true/false); {_where(rows[0])} has "
            f"{rows[0][CORRECTION_COLUMN]!r}",
            int(bad.sum()),
            rows,
        )
    ]


def _signups(
    frames: Mapping[str, pd.DataFrame], context: ValidationContext, customer_ids: Sequence[str]
) -> pd.Series:
    """Return signup dates (UTC midnight) by customer id: this batch's customers, else the stored ones."""
    parts = []
    if context.warehouse is not None:
        stored = context.warehouse.stored_rows("customers", list(customer_ids))
        if not stored.empty:
            parts.append(stored[["customer_id", "signup_date"]])
    if "customers" in frames:
        parts.append(frames["customers"][["customer_id", "signup_date"]])
    if not parts:
        return pd.Series(dtype="datetime64[ns, UTC]")
    both = pd.concat([p.astype({"signup_date": "object"}) for p in parts], ignore_index=True)
    both = both.drop_duplicates("customer_id", keep="last")
    return pd.Series(
        pd.to_datetime(both["signup_date"], utc=True).dt.normalize().to_numpy(),
        index=both["customer_id"].astype("str"),
    )


def check_orders_after_signup(
    frames: Mapping[str, pd.DataFrame], context: ValidationContext, line_offset: int | None = None
) -> list[Failure]:
    """Check that no order is placed before its customer's signup date."""
    orders = frames.get("orders")
    if orders is None or orders.empty:
        return []
    signup = _signups(frames, context, orders["customer_id"].astype("str").unique().tolist())
    if signup.empty:
        return []
    start = orders["customer_id"].astype("str").map(signup)
    ts = pd.to_datetime(orders["ts"], utc=True)
    bad = (start.notna() & (ts < start)).to_numpy()
    if not bad.any():
        return []
    rows = _rows(orders, bad, line_offset, ["order_id", "customer_id", "ts"])
    first = rows[0]
    when = pd.Timestamp(signup[first["customer_id"]]).date()
    return [
        Failure(
            "order_after_signup",
            "ts",
            f"an order must not be placed before its customer's signup_date; order_id {first['order_id']!r} "
            f"of customer {first['customer_id']!r} is dated {first['ts']} but the customer signed up on "
            f"{when} ({_where(first)})",
            int(bad.sum()),
            rows,
        )
    ]


def _order_facts(
    frames: Mapping[str, pd.DataFrame], offsets: Mapping[str, int | None], files: Mapping[str, str]
) -> pd.DataFrame:
    parts = []
    orders = frames.get("orders")
    if orders is not None and not orders.empty:
        corrected = correction_flags(orders)[0].to_numpy()
        parts.append(
            pd.DataFrame(
                {
                    "order_id": orders["order_id"].astype("str"),
                    "customer_id": orders["customer_id"].astype("str"),
                    "revenue": orders["revenue"].astype("float64"),
                    "table": "orders",
                    "pos": np.arange(len(orders)),
                    "corrected": corrected,
                }
            )
        )
    fb = frames.get("feedback")
    if fb is not None and not fb.empty:
        is_order = (
            (fb["event_type"] == "order") & fb["order_id"].notna() & (fb["order_id"].astype("str") != "")
        )
        sub = fb[is_order.to_numpy()]
        parts.append(
            pd.DataFrame(
                {
                    "order_id": sub["order_id"].astype("str"),
                    "customer_id": sub["customer_id"].astype("str"),
                    "revenue": sub["revenue"].astype("float64").fillna(0.0),
                    "table": "feedback",
                    "pos": np.flatnonzero(is_order.to_numpy()),
                    "corrected": False,
                }
            )
        )
    if not parts:
        return pd.DataFrame(
            columns=["order_id", "customer_id", "revenue", "table", "pos", "corrected", "where"]
        )
    facts = pd.concat(parts, ignore_index=True)

    def where(r: Any) -> str:
        off = offsets.get(r.table)
        at = f"line {r.pos + off}" if off is not None else f"row {r.pos}"
        return f"{files.get(r.table, r.table)} {at}"

    facts["where"] = [where(r) for r in facts.itertuples(index=False)]
    return facts


def check_order_consistency(
    frames: Mapping[str, pd.DataFrame],
    context: ValidationContext,
    offsets: Mapping[str, int | None],
    files: Mapping[str, str],
) -> dict[str, list[Failure]]:
    """Check that one order id means one order: same customer and revenue in every file and batch.

    An order id appears in ``orders`` and as ``order`` events of ``feedback``; two of its rows (in
    this batch's files, or one here and one stored) that name another customer or revenue contradict
    each other, unless the ``orders`` row is flagged ``is_correction``.
    """
    facts = _order_facts(frames, offsets, files)
    if facts.empty:
        return {}
    if context.warehouse is not None:
        stored = context.warehouse.order_facts(facts["order_id"].unique().tolist())
        if not stored.empty:
            corrected = set(facts.loc[facts["corrected"].astype(bool), "order_id"])
            stored = stored[~(stored["order_id"].isin(corrected) & (stored["stored_in"] == "orders"))]
            stored = stored.assign(
                table=None, pos=-1, corrected=False, where="stored in " + stored["stored_in"].astype("str")
            )
            facts = pd.concat([facts, stored.drop(columns=["stored_in"])], ignore_index=True)
    facts["rev"] = facts["revenue"].astype("float64").round(6)
    spread = facts.groupby("order_id").agg(n_cust=("customer_id", "nunique"), n_rev=("rev", "nunique"))
    bad_ids = spread.index[(spread["n_cust"] > 1) | (spread["n_rev"] > 1)]
    if not len(bad_ids):
        return {}
    out: dict[str, list[Failure]] = {}
    for table in ("orders", "feedback"):
        mine = facts[facts["order_id"].isin(bad_ids) & (facts["table"] == table)]
        if mine.empty:
            continue
        ids = sorted(mine["order_id"].unique())
        rows, texts = [], []
        for oid in ids[:MAX_SAMPLE_ROWS]:
            group = facts[facts["order_id"] == oid]
            column = "customer_id" if group["customer_id"].nunique() > 1 else "revenue"
            values = [
                f"{r.where}: customer {r.customer_id!r}, revenue {r.revenue:g}" for r in group.itertuples()
            ]
            texts.append(f"order_id {oid!r} ({column} differs) - " + "; ".join(values))
            rows.append({"order_id": oid, "column": column, "rows": values})
        out[table] = [
            Failure(
                "one_order_per_id",
                "order_id",
                "an order id must name one order (same customer and revenue in every file and batch; flag "
                f"a correction with {CORRECTION_COLUMN}=1 in orders): " + " | ".join(texts),
                len(ids),
                rows,
            )
        ]
    return out


def check_feedback_references(
    feedback: pd.DataFrame, context: ValidationContext, line_offset: int | None = None
) -> list[Failure]:
    """Check feedback against the campaigns CouponOps ran: known campaign, its ledger, after its send.

    Every event must name a known campaign, a customer of that campaign's allocation and, when it
    names a coupon, the coupon the campaign allocated to that customer; a redemption needs an
    allocated coupon, a delivered/open/click event a message of the campaign sent to the customer;
    and no event may be dated before the campaign's send (``as_of``).
    """
    if context.warehouse is None or feedback.empty:
        return []
    sends = context.warehouse.campaigns()
    known = sorted(sends)
    cid = feedback["campaign_id"].astype("str")
    unknown = ~cid.isin(sends)
    out: list[Failure] = []
    show = ["event_id", "campaign_id", "customer_id", "event_type", "ts", "coupon_id"]
    if unknown.any():
        names = sorted(cid[unknown].unique())
        rows = _rows(feedback, unknown, line_offset, show)
        listing = (
            f"known campaign ids: {known[:20]}" + (" ..." if len(known) > 20 else "")
            if known
            else "the warehouse holds no campaign yet"
        )
        out.append(
            Failure(
                "known_campaign",
                "campaign_id",
                f"feedback must reference a campaign CouponOps ran; campaign_id {names[:MAX_SAMPLE_ROWS]} "
                f"unknown ({_where(rows[0])}); {listing}",
                int(unknown.sum()),
                rows,
            )
        )
    ok = ~unknown
    if not ok.any():
        return out
    as_of = pd.to_datetime(cid.map({k: v for k, v in sends.items()}), utc=True)
    ts = pd.to_datetime(feedback["ts"], utc=True)
    early = (ok & (ts < as_of)).to_numpy()
    if early.any():
        rows = _rows(feedback, early, line_offset, show)
        first = rows[0]
        sent = pd.Timestamp(sends[first["campaign_id"]]).isoformat()
        out.append(
            Failure(
                "after_send",
                "ts",
                f"feedback must not be dated before its campaign's send; event {first['event_id']!r} of "
                f"campaign {first['campaign_id']!r} is dated {first['ts']}, the campaign was sent at "
                f"{sent} ({_where(first)})",
                int(early.sum()),
                rows,
            )
        )
    ledger = context.warehouse.campaign_ledger(sorted(set(cid[ok])))
    frame = feedback.assign(_pos=np.arange(len(feedback)), campaign_id=cid)
    if ledger.empty:
        ledger = pd.DataFrame(columns=["campaign_id", "customer_id", "coupon_id", "delivered"])
    ledger = ledger.rename(columns={"coupon_id": "allocated_coupon"})
    merged = frame[ok.to_numpy()].merge(
        ledger.assign(_in_ledger=True), on=["campaign_id", "customer_id"], how="left"
    )
    in_ledger = merged["_in_ledger"].eq(True).to_numpy()
    allocated = merged["allocated_coupon"].astype("object").where(merged["allocated_coupon"].notna(), "")
    coupon = merged["coupon_id"].astype("object").where(merged["coupon_id"].notna(), "").astype("str")
    kind = merged["event_type"].astype("str")
    delivered = merged["delivered"].eq(True).to_numpy()

    def fail(name: str, column: str, mask: np.ndarray, text: str) -> None:
        if not mask.any():
            return
        pos = merged.loc[mask, "_pos"].to_numpy()
        full = np.zeros(len(feedback), dtype=bool)
        full[pos] = True
        rows = _rows(feedback, full, line_offset, show)
        out.append(
            Failure(name, column, text.format(**rows[0], where=_where(rows[0])), int(mask.sum()), rows)
        )

    fail(
        "in_campaign_ledger",
        "customer_id",
        ~in_ledger,
        "feedback must be about a customer of the campaign's allocation; customer {customer_id!r} was not "
        "allocated by campaign {campaign_id!r} (event {event_id!r}, {where})",
    )
    wrong_coupon = in_ledger & (
        ((coupon != "") & (coupon != allocated.astype("str")))
        | ((kind == "redeem") & (allocated.astype("str") == ""))
    )
    fail(
        "coupon_of_campaign",
        "coupon_id",
        wrong_coupon.to_numpy(),
        "a redemption or coupon in feedback must be the coupon the campaign allocated to that customer; "
        "event {event_id!r} ({event_type}) names coupon {coupon_id!r} for customer {customer_id!r}, which "
        "campaign {campaign_id!r} never allocated to them ({where})",
    )
    no_message = in_ledger & kind.isin(_MESSAGE_EVENTS).to_numpy() & ~delivered
    fail(
        "delivery_of_campaign",
        "event_type",
        no_message,
        "delivered/open/click feedback needs a message of the campaign sent to the customer; campaign "
        "{campaign_id!r} sent none to customer {customer_id!r} (event {event_id!r}, {where})",
    )
    return out


def check_log_ownership(
    df: pd.DataFrame, context: ValidationContext, line_offset: int | None = None
) -> list[Failure]:
    """Check that a shop batch's campaign log does not take the name of a log another source owns."""
    if context.warehouse is None or df.empty:
        return []
    owners = context.warehouse.log_owners()
    names = df["campaign_id"].astype("str")
    owned = names.map(lambda n: owners.get(n, SHOP_LOG_KIND) != SHOP_LOG_KIND)
    if not owned.any():
        return []
    clash = sorted(names[owned].unique())
    rows = _rows(df, owned, line_offset, ["campaign_id", "customer_id"])
    return [
        Failure(
            "log_name_owned",
            "campaign_id",
            f"campaign log {clash[0]!r} already exists from another source ({owners[clash[0]]}); a shop "
            "batch may not overwrite it (rename the campaign in the export, or rename the other log)",
            int(owned.sum()),
            rows,
        )
    ]


def check_table_references(
    df: pd.DataFrame, table: str, context: ValidationContext, line_offset: int | None = None
) -> list[Failure]:
    """Run the rules of one table that need the warehouse or a sane-window bound (not the other frames)."""
    out = check_contradictions(df, table, context, line_offset)
    if table == "coupons":
        out += check_coupon_validity(df, context, line_offset)
    if table == "orders":
        out += check_correction_flags(df, line_offset)
    if table == "campaign_log":
        out += check_log_ownership(df, context, line_offset)
    if table == "feedback":
        out += check_feedback_references(df, context, line_offset)
    return out


def check_batch_references(
    frames: Mapping[str, pd.DataFrame],
    context: ValidationContext,
    offsets: Mapping[str, int | None] | None = None,
    files: Mapping[str, str] | None = None,
) -> dict[str, list[Failure]]:
    """Run every rule across tables and batches on a batch's frames.

    Args:
        frames: The typed frames of the batch, by table.
        context: Run parameters; ``context.warehouse`` enables the rules against stored rows.
        offsets: File line of data row 0 per table (CSV: 2).
        files: File name per table, for messages.

    Returns:
        Failures per table (tables without failures are absent).
    """
    offsets = dict(offsets or {})
    files = dict(files or {})
    out: dict[str, list[Failure]] = {}
    for table, df in frames.items():
        found = check_table_references(df, table, context, offsets.get(table))
        if found:
            out.setdefault(table, []).extend(found)
    after = check_orders_after_signup(frames, context, offsets.get("orders"))
    if after:
        out.setdefault("orders", []).extend(after)
    for table, found in check_order_consistency(frames, context, offsets, files).items():
        out.setdefault(table, []).extend(found)
    return out
