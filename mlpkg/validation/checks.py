"""Contract rules that one Great Expectations expectation cannot express.

They need context from outside the frame (known ids, the previous batch, a reference sample, a
campaign spec) or pandas dtypes that GX 1.x does not recognise (pandas 3's ``str`` and
tz-aware timestamps). Each returns :class:`~mlpkg.validation.contract.Failure` objects, the same
shape the gate builds from GX results, so reports and messages treat both alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from mlpkg.validation.contract import MAX_SAMPLE_ROWS, Failure, ValidationReport, plain_value
from mlpkg.validation.readers import MAX_LENGTHS, RAW_SCHEMAS, text_problems

#: Drift is watched on these columns unless the context names others.
DEFAULT_DRIFT_COLUMNS: dict[str, list[str]] = {
    "customers": ["region", "device", "segment"],
    "consent": ["channel", "opted_in"],
    "events": ["event_type", "category"],
    "orders": ["revenue", "n_items"],
    "campaign_log": ["arm", "revenue"],
    "feedback": ["event_type", "revenue"],
}


def sample_rows(
    df: pd.DataFrame,
    mask: pd.Series | np.ndarray,
    *,
    max_rows: int = MAX_SAMPLE_ROWS,
    line_offset: int | None = None,
    columns: Sequence[str] | None = None,
) -> list[dict]:
    """Return up to ``max_rows`` rows selected by ``mask`` as dicts with their position.

    Args:
        df: The frame.
        mask: Boolean mask (aligned with ``df``) of failing rows.
        max_rows: Rows to keep.
        line_offset: File line of data row 0 (2 for a CSV with a header); adds ``_line``.
        columns: Columns to include (default all).

    Returns:
        Dicts with ``_row`` (0-based position), optionally ``_line``, then the row's values as
        plain JSON values (timestamps as ISO text, NaN as None).
    """
    positions = np.flatnonzero(np.asarray(mask, dtype=bool))[:max_rows]
    return rows_at(df, positions, line_offset=line_offset, columns=columns)


def rows_at(
    df: pd.DataFrame,
    positions: Iterable[int],
    *,
    line_offset: int | None = None,
    columns: Sequence[str] | None = None,
) -> list[dict]:
    """Return the rows at integer ``positions`` as dicts with ``_row`` (and ``_line``)."""
    cols = list(columns) if columns is not None else list(df.columns)
    out = []
    for pos in positions:
        row: dict = {"_row": int(pos)}
        if line_offset is not None:
            row["_line"] = int(pos) + line_offset
        values = df.iloc[int(pos)]
        row.update({c: plain_value(values[c]) for c in cols})
        out.append(row)
    return out


def _kind_ok(series: pd.Series, kind: str) -> bool:
    dtype = series.dtype
    if kind in ("id", "str"):
        return pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype)
    if kind in ("timestamp", "date"):
        return isinstance(dtype, pd.DatetimeTZDtype)
    if kind in ("int", "flag"):
        # An integer column with blanks is float; the not-null rule reports the blanks.
        return pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_float_dtype(dtype)
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


_KIND_TEXT = {
    "id": "string", "str": "string", "timestamp": "UTC timestamp", "date": "UTC timestamp",
    "int": "integer", "flag": "integer 0/1", "float": "numeric",
}


def check_column_types(df: pd.DataFrame, table: str) -> list[Failure]:
    """Check declared column types of a raw table (GX 1.x type expectations misread pandas 3 dtypes).

    Args:
        df: The frame.
        table: Raw table name (product tables have no declared types and pass).

    Returns:
        One failure per column whose dtype does not match its declared kind.
    """
    if table not in RAW_SCHEMAS:
        return []
    out = []
    for spec in RAW_SCHEMAS[table].columns:
        if spec.name in df.columns and not _kind_ok(df[spec.name], spec.kind):
            out.append(Failure(
                "column_type", spec.name,
                f"{spec.name} must be {_KIND_TEXT[spec.kind]} (dtype is {df[spec.name].dtype})", len(df),
            ))
    return out


def check_finite(df: pd.DataFrame, *, line_offset: int | None = None,
                 max_rows: int = MAX_SAMPLE_ROWS) -> list[Failure]:
    """Check that no float column holds +/-inf (NaN is the not-null rule's business).

    Args:
        df: The frame.
        line_offset: File line of data row 0, for messages.
        max_rows: Failing rows kept per column.

    Returns:
        One failure per column holding infinities.
    """
    out = []
    for col in df.columns:
        if not pd.api.types.is_float_dtype(df[col].dtype):
            continue
        bad = np.isinf(df[col].to_numpy(dtype="float64", na_value=np.nan))
        if bad.any():
            out.append(Failure(
                "values_finite", col, f"{col} must be finite (no inf/-inf)", int(bad.sum()),
                sample_rows(df, bad, max_rows=max_rows, line_offset=line_offset),
            ))
    return out


def check_extra_columns(df: pd.DataFrame, table: str, *, strict: bool) -> tuple[list[Failure], list[Failure]]:
    """Report columns a raw table's contract does not declare.

    Args:
        df: The frame.
        table: Raw table name (product tables may carry extra columns freely).
        strict: Report them as failures instead of warnings.

    Returns:
        ``(failures, warnings)``.
    """
    if table not in RAW_SCHEMAS:
        return [], []
    declared = set(RAW_SCHEMAS[table].column_names)
    found = [
        Failure("unexpected_column", str(c),
                f"column '{c}' is not in the {table} contract"
                + (" (strict mode: rejected)" if strict else " (kept, ignored downstream)"), 1)
        for c in df.columns if c not in declared
    ]
    return (found, []) if strict else ([], found)


def check_referential(
    df: pd.DataFrame,
    column: str,
    known: Iterable[str],
    *,
    what: str,
    line_offset: int | None = None,
    max_rows: int = MAX_SAMPLE_ROWS,
) -> list[Failure]:
    """Check that every non-empty value of ``column`` is a known id.

    Args:
        df: The frame.
        column: Id column (values ``""``/null are skipped: "no coupon" is legal).
        known: The ids that exist.
        what: Plural noun for messages, e.g. ``"customers"``.
        line_offset: File line of data row 0, for messages.
        max_rows: Failing rows to keep.

    Returns:
        A failure listing unknown ids, or nothing.
    """
    if column not in df.columns:
        return []
    values = df[column]
    known_set = known if isinstance(known, set | frozenset) else set(known)
    present = values.notna() & (values.astype("str") != "")
    unknown = present & ~values.isin(known_set)
    n = int(unknown.sum())
    if not n:
        return []
    examples = sorted(values[unknown].astype("str").unique()[:max_rows].tolist())
    return [Failure(
        "referential_integrity", column,
        f"{column} must exist in the known {what} ({len(known_set)} known); unknown e.g. {examples}",
        n, sample_rows(df, unknown, max_rows=max_rows, line_offset=line_offset),
    )]


def check_arm_consistency(df: pd.DataFrame, *, control: str = "control", line_offset: int | None = None,
                          max_rows: int = MAX_SAMPLE_ROWS) -> list[Failure]:
    """Check that ``arm`` equals ``coupon_id@channel``, and control rows have neither.

    Args:
        df: Frame with ``arm``, ``coupon_id`` and ``channel`` (others are skipped).
        control: The control arm's label.
        line_offset: File line of data row 0, for messages.
        max_rows: Failing rows to keep.

    Returns:
        A failure for rows where the three columns disagree, or nothing.
    """
    if not {"arm", "coupon_id", "channel"} <= set(df.columns):
        return []
    arm = df["arm"].astype("str")
    coupon = df["coupon_id"].fillna("").astype("str")
    channel = df["channel"].fillna("").astype("str")
    is_control = arm == control
    expected = coupon + "@" + channel
    control_with_offer = is_control & ((coupon != "") | (channel != ""))
    bad = control_with_offer | (~is_control & df["arm"].notna() & (arm != expected))
    n = int(bad.sum())
    if not n:
        return []
    return [Failure(
        "arm_consistency", "arm",
        f"arm must equal '<coupon_id>@<channel>' and '{control}' rows must have empty coupon_id and channel",
        n,
        sample_rows(df, bad, max_rows=max_rows, line_offset=line_offset,
                    columns=["arm", "coupon_id", "channel"]),
    )]


def check_volume(table: str, row_count: int, previous: int | None, *, min_ratio: float = 0.2,
                 max_ratio: float = 5.0) -> list[Failure]:
    """Check the batch's row count against the previous batch of the same table.

    Args:
        table: Table name, for the message.
        row_count: Rows in this batch.
        previous: Rows in the previous batch (``None`` or 0: nothing to compare).
        min_ratio: Fewer than ``min_ratio * previous`` rows fails (a partial export).
        max_ratio: More than ``max_ratio * previous`` rows fails (a duplicated export).

    Returns:
        A failure, or nothing.
    """
    if not previous:
        return []
    ratio = row_count / previous
    if min_ratio <= ratio <= max_ratio:
        return []
    return [Failure(
        "volume_anomaly", None,
        f"{table} row count {row_count} is {ratio:.2f}x the previous batch ({previous}); "
        f"expected between {min_ratio}x and {max_ratio}x",
        row_count,
    )]


def population_stability_index(reference: pd.Series, current: pd.Series, *, bins: int = 10) -> float:
    """Return the PSI of ``current`` against ``reference`` (0 = same distribution).

    Numeric columns are cut at the reference's deciles; others compare category shares. Empty
    bins get a small floor so one new category gives a large but finite value.

    Args:
        reference: Reference sample.
        current: New sample.
        bins: Quantile bins for numeric columns.

    Returns:
        PSI (> 0.25 is conventionally a significant shift).
    """
    ref, cur = reference.dropna(), current.dropna()
    if ref.empty or cur.empty:
        return 0.0
    numeric = (pd.api.types.is_numeric_dtype(ref.dtype) and pd.api.types.is_numeric_dtype(cur.dtype)
               and not pd.api.types.is_bool_dtype(ref.dtype))
    if numeric:
        r = ref.to_numpy(dtype="float64")
        c = cur.to_numpy(dtype="float64")
        edges = np.unique(np.quantile(r, np.linspace(0, 1, bins + 1))[1:-1])
        p = np.bincount(np.searchsorted(edges, r, side="right"), minlength=len(edges) + 1) / len(r)
        q = np.bincount(np.searchsorted(edges, c, side="right"), minlength=len(edges) + 1) / len(c)
    else:
        rs = ref.astype("str").value_counts(normalize=True)
        cs = cur.astype("str").value_counts(normalize=True)
        cats = rs.index.union(cs.index)
        p = rs.reindex(cats, fill_value=0.0).to_numpy()
        q = cs.reindex(cats, fill_value=0.0).to_numpy()
    p = np.maximum(p, 1e-4)
    q = np.maximum(q, 1e-4)
    return float(np.sum((q - p) * np.log(q / p)))


def check_drift(df: pd.DataFrame, reference: pd.DataFrame, columns: Sequence[str], *,
                threshold: float = 0.25) -> list[Failure]:
    """Compare key columns with a reference sample; PSI above ``threshold`` is reported.

    Args:
        df: The new frame.
        reference: Reference sample of the same table.
        columns: Columns to compare (missing ones are skipped).
        threshold: PSI above which a column is reported.

    Returns:
        Findings meant as warnings (drift is a signal for retraining, not bad data).
    """
    out = []
    for col in columns:
        if col not in df.columns or col not in reference.columns:
            continue
        psi = population_stability_index(reference[col], df[col])
        if psi > threshold:
            out.append(Failure(
                "distribution_drift", col,
                f"{col} distribution shifted from the reference: PSI {psi:.3f} > {threshold}", len(df),
            ))
    return out


def validate_campaign_log(
    df: pd.DataFrame,
    *,
    id_column: str,
    treatment_column: str,
    arms: set[str],
    control_label: str,
    propensity_column: str | None,
    outcome_columns: Sequence[str],
    unique_ids: bool = True,
    source: str | None = None,
    max_rows: int = MAX_SAMPLE_ROWS,
) -> ValidationReport:
    """Validate an imported randomised-campaign log against its declared spec.

    Args:
        df: The log, one row per unit.
        id_column: Unit id column (e.g. ``customer_id``).
        treatment_column: Column holding the arm label.
        arms: Declared arm labels (with or without the control label).
        control_label: Label of the no-treatment arm in this log.
        propensity_column: Assignment probability column, or ``None`` when the log has none.
        outcome_columns: Outcome columns (numeric, e.g. converted, revenue).
        unique_ids: Each unit appears once (set False for logs spanning several campaigns).
        source: File path or name for messages; defaults to ``campaign_log``.
        max_rows: Failing rows kept per failure.

    Returns:
        A report with a failure for: missing columns, null/duplicate ids, ids not stored as text,
        with surrounding whitespace, control or invisible characters or longer than the warehouse
        column, labels outside the spec,
        fewer than two arms or no control rows, propensities outside (0, 1], non-numeric or
        non-finite outcomes; and a warning for declared arms without rows.
    """
    src = str(source) if source is not None else "campaign_log"
    report = ValidationReport(table="campaign_log", source=src, row_count=len(df))
    needed = [id_column, treatment_column, *([propensity_column] if propensity_column else []),
              *outcome_columns]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        report.failures += [Failure("required_column", c, f"column '{c}' declared in the spec is missing "
                                    f"(log has {list(df.columns)})", 1) for c in missing]
        return report
    if df.empty:
        report.failures.append(Failure("not_empty", None, "campaign log has no rows", 0))
        return report

    def fail(name: str, col: str | None, text: str, mask: pd.Series) -> None:
        n = int(mask.sum())
        if n:
            report.failures.append(Failure(name, col, text, n, sample_rows(df, mask, max_rows=max_rows)))

    ids = df[id_column]
    fail("ids_not_null", id_column, f"{id_column} must not be null or empty",
         ids.isna() | (ids.astype("str").str.strip() == ""))
    # Ids are exact strings: a float-typed id column or " u1" would silently make new units.
    report.failures += text_problems(df, id_column, max_length=MAX_LENGTHS[("campaign_log", "customer_id")])
    if unique_ids:
        fail("ids_unique", id_column, f"{id_column} must be unique (one row per unit)",
             ids.notna() & ids.duplicated(keep=False))

    # Labels compare as text so a log with integer arms (0/1) matches a spec written either way.
    control_label = str(control_label)
    allowed = {str(a) for a in arms} | {control_label}
    labels = df[treatment_column]
    fail("treatment_in_spec", treatment_column,
         f"{treatment_column} must be one of the declared arms {sorted(allowed)}",
         labels.isna() | ~labels.astype("str").isin(allowed))
    seen = set(labels.dropna().astype("str").unique())
    if len(seen) < 2:
        report.failures.append(Failure(
            "at_least_two_arms", treatment_column,
            f"{treatment_column} holds a single arm {sorted(seen)}: no contrast to learn uplift from", 1,
        ))
    if control_label not in seen:
        report.failures.append(Failure(
            "control_present", treatment_column,
            f"no rows with the control label '{control_label}' (arms seen: {sorted(seen)}): "
            "uplift needs a randomised control group", 1,
        ))
    for arm in sorted(allowed - seen):
        report.warnings.append(Failure("declared_arm_present", treatment_column,
                                       f"declared arm '{arm}' has no rows", 0))

    if propensity_column:
        p = pd.to_numeric(df[propensity_column], errors="coerce")
        fail("propensity_in_range", propensity_column,
             f"{propensity_column} must be a number in (0, 1]",
             p.isna() | ~np.isfinite(p) | (p <= 0) | (p > 1))
    for col in outcome_columns:
        v = pd.to_numeric(df[col], errors="coerce")
        fail("outcome_numeric", col, f"{col} must be a finite number", v.isna() | ~np.isfinite(v))
    return report

