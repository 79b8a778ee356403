"""Bring-your-own campaign logs: a YAML spec, a strict reader and an all-or-nothing import.

A shop that ran a randomised campaign outside CouponOps describes its export with a small YAML
spec (:class:`LogSpec`) and imports it with ``couponops import-log FILE --spec SPEC.yaml``::

    name: spring_sms_test          # the log's name, used by `train --log`
    id_column: user_ref
    treatment:
      column: variant
      control: "holdout"
      costs: {"10pct_sms": 0.8, "5usd_sms": 1.2}   # cost per treated customer, one per arm
    propensity_column: null        # optional
    outcomes:
      conversion: purchased        # required, 0/1
      revenue: order_value         # optional
      extra: [clicked]             # optional binary outcomes, reported but not optimised
    features:                      # optional; when absent, every other column, types inferred
      numeric: [days_since_last_order, lifetime_value]
      categorical: [region, device]

:func:`import_campaign_log` reads the file (UTF-8 CSV or Parquet), checks it against the spec and
either writes the whole log in one transaction or writes nothing: a rejected file is moved (or,
when it lives outside the state folder, copied) to ``<quarantine>/<name>-<UTC stamp>/`` with a
``validation_result.json``, and :class:`~mlpkg.validation.DataContractError` names the file, the
column, the rule and a few failing rows.

Re-importing the same file with the same spec changes nothing. Importing a different file (or the
same file with a different spec) under the name of an earlier *import* replaces that log: its old
rows are deleted and the new ones inserted in the same transaction, so readers see the old log or
the new one, never a mix. A name that a shop batch's log (``hist-...``) or a measured campaign's log
already holds is refused: an import never touches rows another source owns. A spec that gives a
key twice is refused too (naming the key and both lines). A log without a propensity column is
taken to be randomised with fixed arm shares: each row's propensity is its arm's share of the log,
and the log is flagged ``assumed_randomized``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import Engine, select

from mlpkg.config import Settings
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.features import CATEGORICAL_FEATURES, NUMERIC_FEATURES
from mlpkg.validation import DataContractError, Failure, ValidationReport, validate_campaign_log
from mlpkg.validation.contract import DEFAULT_REVENUE_CAP, MAX_SAMPLE_ROWS, LineMap, plain_value

# The raw readers' CSV/Parquet handling (strict UTF-8, empty and truncated files) is exactly what an
# imported log needs; only the column schema differs, so the readers' building blocks are reused.
from mlpkg.validation.readers import _read_csv, _read_parquet, file_refusal, read_file_bytes, text_problems

#: Arm name every log's control label is stored under (the model's head 0).
CONTROL_ARM = "control"
#: Columns of the model input frame; a feature may not take one of these names.
RESERVED_COLUMNS = frozenset({"customer_id", "arm", "converted", "revenue", "propensity", "log_name"})
#: Owner kind of logs written by ``import-log`` (shop batches own ``shop-export`` logs, measured
#: campaigns ``couponops-campaign`` logs); an import never replaces a log another source owns.
IMPORT_LOG_KIND = "import"
#: File written next to a quarantined log.
QUARANTINE_RESULT_FILE = "validation_result.json"
#: An undeclared column whose non-blank values are at least this share numbers is typed numeric, so a
#: few stray strings ("abc", "n/a") in a numeric column fail the import instead of silently turning
#: the column into a high-cardinality categorical.
MOSTLY_NUMERIC = 0.9
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class LogSpecError(ValueError):
    """The YAML spec of a campaign log is malformed; the message names the offending key."""


def _label(value: Any) -> Any:
    # YAML reads `control: 0` or `{1: 0.5}` as numbers; labels compare with the file's text.
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class TreatmentSpec(BaseModel):
    """Which column holds the arm, which label is control, and what each treated arm costs."""

    model_config = ConfigDict(extra="forbid")

    column: str = Field(min_length=1)
    control: str = Field(min_length=1)
    costs: dict[str, float] = Field(min_length=1)

    @field_validator("control", mode="before")
    @classmethod
    def _control_as_text(cls, v: Any) -> Any:
        return _label(v)

    @field_validator("costs", mode="before")
    @classmethod
    def _arm_labels_as_text(cls, v: Any) -> Any:
        return {_label(k): c for k, c in v.items()} if isinstance(v, dict) else v

    @field_validator("costs")
    @classmethod
    def _costs_finite_nonneg(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {arm: c for arm, c in v.items() if not math.isfinite(c) or c < 0}
        if bad:
            raise ValueError(f"cost per treated customer must be a finite number >= 0; got {bad}")
        if any(not arm.strip() for arm in v):
            raise ValueError("arm labels must not be empty")
        return v

    @model_validator(mode="after")
    def _control_is_not_an_arm(self) -> TreatmentSpec:
        if self.control in self.costs:
            raise ValueError(
                f"the control label {self.control!r} is listed in costs; costs name the treated arms only"
            )
        if self.control != CONTROL_ARM and CONTROL_ARM in self.costs:
            raise ValueError(
                f"a treated arm may not be called {CONTROL_ARM!r} (CouponOps stores the control "
                f"label {self.control!r} under that name); rename the arm"
            )
        return self


class OutcomesSpec(BaseModel):
    """Outcome columns: the 0/1 conversion (required), revenue and extra 0/1 outcomes (optional)."""

    model_config = ConfigDict(extra="forbid")

    conversion: str = Field(min_length=1)
    revenue: str | None = None
    extra: list[str] = Field(default_factory=list)


class FeaturesSpec(BaseModel):
    """Declared feature columns and their types."""

    model_config = ConfigDict(extra="forbid")

    numeric: list[str] = Field(default_factory=list)
    categorical: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_disjoint_unreserved(self) -> FeaturesSpec:
        if not self.numeric and not self.categorical:
            raise ValueError("declare at least one numeric or categorical feature, or leave 'features' out")
        both = sorted(set(self.numeric) & set(self.categorical))
        if both:
            raise ValueError(f"columns {both} are declared both numeric and categorical")
        reserved = sorted(RESERVED_COLUMNS & {*self.numeric, *self.categorical})
        if reserved:
            raise ValueError(f"feature names {reserved} are reserved for the model input frame; rename them")
        return self


class LogSpec(BaseModel):
    """The YAML spec of an imported campaign log (see the module docstring for an example)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    id_column: str = Field(min_length=1)
    treatment: TreatmentSpec
    propensity_column: str | None = None
    outcomes: OutcomesSpec
    features: FeaturesSpec | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name becomes a folder name in quarantine and a key in the warehouse.
        if not _NAME.match(v):
            raise ValueError(
                "must be 1-128 characters of letters, digits, '_', '.', '-', starting with a letter or digit"
            )
        return v

    @model_validator(mode="after")
    def _columns_used_once(self) -> LogSpec:
        seen: dict[str, str] = {}
        for key, column in self.column_keys():
            if column in seen:
                raise ValueError(f"column {column!r} is used by both '{seen[column]}' and '{key}'")
            seen[column] = key
        return self

    @property
    def arms(self) -> list[str]:
        """Return the log's labels: the control label first, then the treated arms."""
        return [self.treatment.control, *self.treatment.costs]

    def column_keys(self) -> list[tuple[str, str]]:
        """Return ``(spec key, column)`` for every column the spec names, in spec order."""
        out = [("id_column", self.id_column), ("treatment.column", self.treatment.column)]
        if self.propensity_column:
            out.append(("propensity_column", self.propensity_column))
        out.append(("outcomes.conversion", self.outcomes.conversion))
        if self.outcomes.revenue:
            out.append(("outcomes.revenue", self.outcomes.revenue))
        out += [(f"outcomes.extra[{i}]", c) for i, c in enumerate(self.outcomes.extra)]
        if self.features is not None:
            out += [(f"features.numeric[{i}]", c) for i, c in enumerate(self.features.numeric)]
            out += [(f"features.categorical[{i}]", c) for i, c in enumerate(self.features.categorical)]
        return out

    def outcome_columns(self) -> list[str]:
        """Return the columns that are not features: id, treatment, propensity and outcomes."""
        return [c for key, c in self.column_keys() if not key.startswith("features.")]


def parse_log_spec(data: Any, source: str = "log spec") -> LogSpec:
    """Validate a spec given as a mapping (e.g. parsed YAML).

    Args:
        data: The spec as plain data.
        source: Where it came from, for messages.

    Returns:
        The spec.

    Raises:
        LogSpecError: A key is missing, unknown or has an invalid value; the message names it.
    """
    if not isinstance(data, dict):
        raise LogSpecError(
            f"{source}: a log spec must be a YAML mapping with keys "
            f"{sorted(LogSpec.model_fields)}, got {type(data).__name__}"
        )
    try:
        return LogSpec.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"key '{key}': {msg}")
        raise LogSpecError(f"{source}: invalid log spec: " + "; ".join(problems)) from None


def load_log_spec(path: Path) -> LogSpec:
    """Read and validate a YAML log spec.

    Args:
        path: The YAML file.

    Returns:
        The spec.

    Raises:
        FileNotFoundError: The file does not exist.
        LogSpecError: The file is not valid YAML or breaks the spec's rules (the key is named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"log spec {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - safe subclass
    except _DuplicateKeyError as err:
        raise LogSpecError(f"{path}: {err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise LogSpecError(f"{path}: not a readable UTF-8 YAML file: {err}") from None
    return parse_log_spec(data, source=str(path))


class _DuplicateKeyError(ValueError):
    """A YAML mapping names the same key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last).

    A repeated ``outcomes:`` would otherwise silently drop the first block, and with it turn an
    outcome column into a model feature.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """Build a mapping, raising on a duplicate key with both of its lines."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKeyError(
                    f"duplicate key {key!r} at line {line} (first given at line {seen[key]}); "
                    "each key may appear once in a log spec"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# --- reading and checking -----------------------------------------------------------------------


def read_log_file(path: Path) -> tuple[pd.DataFrame, int | LineMap | None]:
    """Read a campaign log file without assuming its columns.

    Args:
        path: A UTF-8 ``.csv`` (or ``.csv.gz``) with a header row, or a ``.parquet`` file; not a
            symbolic link (it would be neither followed nor copied into quarantine).

    Returns:
        The frame (CSV: every value as text, exactly as written; Parquet: its stored types) and
        the file line of data row 0 (2 for CSV, a :class:`~mlpkg.validation.contract.LineMap` when
        quoted fields span lines, ``None`` for Parquet).

    Raises:
        FileNotFoundError: The file does not exist.
        DataContractError: The file has an unsupported suffix, is a symbolic link, empty,
            header-only, truncated, not UTF-8, has a duplicated header, holds a NUL byte, or is not
            readable Parquet.
    """
    path = Path(path)
    fmt, data = read_file_bytes(path)
    if fmt == "parquet":
        frame, line_offset = _read_parquet(path), None
    else:
        frame, line_offset = _read_csv(path, data)
    frame.columns = [str(c) for c in frame.columns]
    if frame.empty:
        raise file_refusal(
            path,
            [Failure("not_empty", None, "file has a header but no data rows", 0)],
            "header only, no data rows",
        )
    frame = frame.reset_index(drop=True)
    nul = [
        f
        for col in frame.columns
        if pd.api.types.is_string_dtype(frame[col].dtype) or frame[col].dtype == object
        for f in text_problems(frame, col, identifier=False, line_offset=line_offset)
    ]
    if nul:
        raise file_refusal(path, nul, "NUL byte(s) in text values")
    return frame, line_offset


def _numbers(s: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Return ``(values as float, blank mask, mask of non-blank values that are not finite numbers)``."""
    if pd.api.types.is_bool_dtype(s.dtype) or pd.api.types.is_numeric_dtype(s.dtype):
        num = s.astype("float64")
        blank = num.isna()
    else:
        blank = s.isna() | (s.astype("str").str.strip() == "")
        num = pd.to_numeric(s.astype("str").str.strip().where(~blank), errors="coerce").astype("float64")
    bad = ~blank & (num.isna() | ~np.isfinite(num.fillna(0.0)))
    return num, blank, bad


def _texts(s: pd.Series) -> pd.Series:
    """Return a column as text with missing values as ``""`` (a category of its own)."""
    blank = s.isna()
    return s.astype("str").where(~blank, "")


def _failure(
    name: str, column: str, text: str, mask: pd.Series, df: pd.DataFrame, columns: Sequence[str]
) -> list[Failure]:
    n = int(mask.sum())
    if not n:
        return []
    positions = np.flatnonzero(mask.to_numpy(dtype=bool))[:MAX_SAMPLE_ROWS]
    rows = [{"_row": int(p), **{c: plain_value(df.at[p, c]) for c in columns}} for p in positions]
    return [Failure(name, column, text, n, rows)]


def _infer_features(df: pd.DataFrame, spec: LogSpec) -> tuple[list[str], list[str], list[Failure]]:
    """Type every column the spec does not name: numeric if (nearly) all its non-blank values are numbers."""
    used = set(spec.outcome_columns())
    numeric: list[str] = []
    categorical: list[str] = []
    warnings: list[Failure] = []
    for col in df.columns:
        if col in used:
            continue
        if col in RESERVED_COLUMNS:
            warnings.append(
                Failure(
                    "reserved_column",
                    col,
                    f"column '{col}' is a reserved name of the model input frame and is "
                    "not used as a feature (declare features to be explicit)",
                    0,
                )
            )
            continue
        _, blank, bad = _numbers(df[col])
        filled = int((~blank).sum())
        mostly_numbers = filled > 0 and (filled - int(bad.sum())) / filled >= MOSTLY_NUMERIC
        (numeric if mostly_numbers else categorical).append(col)
    return numeric, categorical, warnings


def check_campaign_log(
    df: pd.DataFrame,
    spec: LogSpec,
    *,
    source: str,
    strict: bool = False,
    line_offset: int | None = None,
) -> tuple[ValidationReport, list[str], list[str]]:
    """Check a log frame against its spec and settle the feature columns and their types.

    Args:
        df: The log as read by :func:`read_log_file`.
        spec: Its spec.
        source: File path, for messages.
        strict: Columns the spec does not name (when it declares features) fail instead of warning.
        line_offset: File line of data row 0, so failing rows name their CSV line.

    Returns:
        ``(report, numeric features, categorical features)``; ``report.success`` is False when any
        rule failed: a column named by the spec is missing, ids are null or duplicated, a label is
        not in the spec, the log has a single arm or no control rows, a propensity is outside
        (0, 1], conversion or an extra outcome is not 0/1, revenue is outside [0, 1e6], or a
        numeric feature holds something other than a finite number.
    """
    report = ValidationReport(table="campaign_log", source=source, row_count=len(df))
    columns = list(df.columns)
    missing = [(key, col) for key, col in spec.column_keys() if col not in columns]
    if missing:
        report.failures += [
            Failure(
                "spec_column_exists",
                col,
                f"column '{col}' named by spec key '{key}' is not in the file (file has {columns})",
                1,
            )
            for key, col in missing
        ]
        return report, [], []
    outcomes = [
        spec.outcomes.conversion,
        *([spec.outcomes.revenue] if spec.outcomes.revenue else []),
        *spec.outcomes.extra,
    ]
    base = validate_campaign_log(
        df,
        id_column=spec.id_column,
        treatment_column=spec.treatment.column,
        arms=set(spec.treatment.costs),
        control_label=spec.treatment.control,
        propensity_column=spec.propensity_column,
        outcome_columns=outcomes,
        source=source,
    )
    report.failures += base.failures
    report.warnings += base.warnings
    show = [spec.id_column, spec.treatment.column]

    for col, rule, kind in [
        (spec.outcomes.conversion, "conversion_binary", "conversion"),
        *[(c, "outcome_binary", "extra outcome") for c in spec.outcomes.extra],
    ]:
        num, _, _ = _numbers(df[col])
        report.failures += _failure(
            rule, col, f"{kind} {col} must be 0 or 1", num.notna() & ~num.isin([0.0, 1.0]), df, [*show, col]
        )
    if spec.outcomes.revenue:
        col = spec.outcomes.revenue
        num, _, _ = _numbers(df[col])
        report.failures += _failure(
            "revenue_range",
            col,
            f"revenue {col} must be between 0 and {DEFAULT_REVENUE_CAP:g}",
            num.notna() & ((num < 0) | (num > DEFAULT_REVENUE_CAP)),
            df,
            [*show, col],
        )
        converted, _, _ = _numbers(df[spec.outcomes.conversion])
        report.failures += _failure(
            "revenue_needs_conversion",
            col,
            f"revenue {col} must be 0 where conversion {spec.outcomes.conversion} is 0 (revenue without "
            "a conversion)",
            num.fillna(0.0).gt(0) & converted.eq(0),
            df,
            [*show, spec.outcomes.conversion, col],
        )

    if spec.features is None:
        numeric, categorical, inferred_warnings = _infer_features(df, spec)
        report.warnings += inferred_warnings
    else:
        numeric, categorical = list(spec.features.numeric), list(spec.features.categorical)
        named = {c for _, c in spec.column_keys()}
        for col in (c for c in columns if c not in named):
            text = f"column '{col}' is not named by the spec" + (
                " (strict mode: rejected)" if strict else " (kept out of the import)"
            )
            found = Failure("unexpected_column", col, text, 1)
            (report.failures if strict else report.warnings).append(found)
    how = "declared numeric"
    if spec.features is None:
        how = "inferred numeric (nearly all its values are numbers; else declare it in features.categorical)"
    for col in numeric:
        _, _, bad = _numbers(df[col])
        report.failures += _failure(
            "feature_numeric",
            col,
            f"feature {col} is {how} and must hold finite numbers (blanks are allowed and imputed)",
            bad,
            df,
            [*show, col],
        )
    report.failures = [_tidy_rows(f, show, line_offset) for f in report.failures]
    return report, numeric, categorical


def _tidy_rows(failure: Failure, show: list[str], line_offset: int | None) -> Failure:
    """Keep the id, treatment and failing column of sample rows (a wide log would bury them); add lines."""
    keep = {"_row", "_line", *show, failure.column}
    rows = []
    for r in failure.sample_rows:
        row = {k: v for k, v in r.items() if k in keep}
        if line_offset is not None and "_row" in row:
            row["_line"] = row["_row"] + line_offset
        rows.append(row)
    return dataclasses.replace(failure, sample_rows=rows)


# --- quarantine and import ---------------------------------------------------------------------------


def _quarantine(file: Path, spec: LogSpec, settings: Settings, payload: dict[str, Any]) -> tuple[Path, bool]:
    """Put the rejected file in quarantine; return the folder and whether the original was moved."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    root = settings.quarantine_dir
    dest = root / f"{spec.name}-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = root / f"{spec.name}-{stamp}-{n}"
    dest.mkdir(parents=True)
    # Files that landed in the state folder belong to CouponOps and are moved, as rejected batches
    # are; a user's own export elsewhere is copied so their original is never touched.
    moved = file.resolve().is_relative_to(settings.state_dir.resolve())
    linked = file.is_symlink()  # a link is refused and never followed: its target is not copied
    if linked:
        moved = False
    elif moved:
        shutil.move(str(file), str(dest / file.name))
    else:
        shutil.copy2(file, dest / file.name)
    kept = None if linked else str(dest / file.name)
    payload = {**payload, "quarantined_file": kept, "original_moved": moved}
    (dest / QUARANTINE_RESULT_FILE).write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    return dest, moved


def _reject(file: Path, spec: LogSpec, settings: Settings, report: ValidationReport) -> DataContractError:
    payload = {
        "log": spec.name,
        "file": str(file),
        "original_path": str(file.resolve()),
        "success": False,
        "validated_at": datetime.now(UTC).isoformat(),
        "spec": spec.model_dump(mode="json"),
        "report": report.to_dict(include_gx=False),
    }
    dest, moved = _quarantine(file, spec, settings, payload)
    action = "Moved" if moved else "Copied (original left in place)"
    head = (
        f"Campaign log '{spec.name}' from {file} rejected by its data contract: "
        f"{len(report.failures)} rule(s) failed; nothing was written to the warehouse. "
        f"{action} to {dest} (see {QUARANTINE_RESULT_FILE})."
    )
    return DataContractError(
        f"{head}\n{report.message()}", failures=report.failures, reports=[report], quarantine_path=dest
    )


def import_campaign_log(
    engine: Engine, file: Path, spec: LogSpec, settings: Settings, *, now: datetime
) -> dict:
    """Validate a campaign log against its spec and write it to the warehouse in one transaction.

    The same file and spec again is a no-op (``status == "unchanged"``). A different file or spec
    under an existing name replaces that log: old rows are deleted and new ones inserted in the
    same transaction, so no reader ever sees a mix of the two.

    Args:
        engine: The warehouse.
        file: The log (UTF-8 CSV with a header row, or Parquet).
        spec: Its spec.
        settings: CouponOps settings (quarantine folder, ``strict_columns``).
        now: Import time, stored as ``imported_at``.

    Returns:
        A summary: name, source, status (``imported``, ``replaced`` or ``unchanged``), rows, rows,
        share and cost per arm (control first, as ``"control"``), control label and rows, how
        propensities were obtained (``"logged (<column>)"`` or ``"estimated (assumed randomized)"``),
        ``assumed_randomized``, the feature columns (and whether their types were inferred) and
        warnings (e.g. columns the spec does not name).

    Raises:
        FileNotFoundError: ``file`` does not exist.
        DataContractError: The file is unreadable or breaks its spec; it was quarantined (see
            ``err.quarantine_path``) and the warehouse is unchanged.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"campaign log {file} does not exist")
    try:
        df, line_offset = read_log_file(file)
    except DataContractError as err:
        report = ValidationReport(table="campaign_log", source=str(file), failures=err.failures)
        raise _reject(file, spec, settings, report) from None
    report, numeric, categorical = check_campaign_log(
        df, spec, source=str(file), strict=settings.strict_columns, line_offset=line_offset
    )
    if not report.success:
        raise _reject(file, spec, settings, report)

    arm = _texts(df[spec.treatment.column]).replace({spec.treatment.control: CONTROL_ARM})
    shares = arm.value_counts(normalize=True)
    if spec.propensity_column:
        propensity = _numbers(df[spec.propensity_column])[0]
    else:
        propensity = arm.map(shares).astype("float64")
    record = {
        **spec.model_dump(mode="json"),
        "features": {"numeric": numeric, "categorical": categorical},
        "features_inferred": spec.features is None,
        "source_sha256": q.file_sha256(file),
    }
    rows = _pseudonymous(engine, settings, _log_rows(df, spec, arm, propensity, numeric, categorical))
    with session_scope(engine) as session:
        owner = q.campaign_log_owners(session).get(spec.name, IMPORT_LOG_KIND)
    if owner != IMPORT_LOG_KIND:
        report.failures.append(
            Failure(
                "log_name_owned",
                "name",
                f"campaign log name {spec.name!r} belongs to a log from another source ({owner}, e.g. a "
                "shop batch); an import may not replace it; choose another `name` in the spec",
                1,
            )
        )
        raise _reject(file, spec, settings, report)
    with session_scope(engine) as session:
        existing = session.get(m.CampaignLog, spec.name)
        if existing is not None and q.campaign_log_owners(session).get(spec.name) != IMPORT_LOG_KIND:
            # Another source took the name between the check and this transaction.
            raise ValueError(
                f"campaign log name {spec.name!r} was just taken by another source; nothing written"
            )
        if existing is not None and existing.spec == record and existing.source == str(file):
            status = "unchanged"
        else:
            status = "imported" if existing is None else "replaced"
            # Replacing a log is delete + insert inside this one transaction: atomic for readers.
            q.delete_rows(session, m.CampaignLogRow, log_name=spec.name)
            q.upsert_rows(
                session,
                m.CampaignLog,
                [
                    dict(
                        name=spec.name,
                        source=str(file),
                        control_label=spec.treatment.control,
                        arm_costs=dict(spec.treatment.costs),
                        spec=record,
                        assumed_randomized=not spec.propensity_column,
                        n_rows=len(rows),
                        sent_at=None,
                        imported_at=now,
                    )
                ],
            )
            q.upsert_rows(session, m.CampaignLogRow, rows)
    counts = arm.value_counts()
    arms = [CONTROL_ARM, *spec.treatment.costs]
    return {
        "name": spec.name,
        "source": str(file),
        "status": status,
        "rows": len(df),
        "arms": {a: int(counts.get(a, 0)) for a in arms},
        "arm_share": {a: round(float(shares.get(a, 0.0)), 6) for a in arms},
        "arm_costs": {a: float(c) for a, c in spec.treatment.costs.items()},
        "control_label": spec.treatment.control,
        "control_rows": int(counts.get(CONTROL_ARM, 0)),
        "propensity": (
            f"logged ({spec.propensity_column})"
            if spec.propensity_column
            else "estimated (assumed randomized)"
        ),
        "assumed_randomized": not spec.propensity_column,
        "features": {"numeric": numeric, "categorical": categorical, "inferred": spec.features is None},
        "warnings": [w.describe() for w in report.warnings],
    }


def _pseudonymous(engine: Engine, settings: Settings, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the rows with the customers' pseudonyms, without forgotten customers (mlpkg.privacy)."""
    from mlpkg.privacy import pseudonymiser

    frame = pd.DataFrame({"customer_id": [r["customer_id"] for r in rows]})
    ids = pseudonymiser(engine, settings)("campaign_log", frame)["customer_id"]
    return [{**rows[i], "customer_id": str(cid)} for i, cid in zip(ids.index, ids, strict=True)]


def _log_rows(
    df: pd.DataFrame,
    spec: LogSpec,
    arm: pd.Series,
    propensity: pd.Series,
    numeric: list[str],
    categorical: list[str],
) -> list[dict[str, Any]]:
    ids = _texts(df[spec.id_column]).to_numpy()
    converted = _numbers(df[spec.outcomes.conversion])[0].astype("int64").to_numpy()
    if spec.outcomes.revenue:
        revenue = _numbers(df[spec.outcomes.revenue])[0].fillna(0.0).to_numpy()
    else:
        revenue = np.zeros(len(df))
    extra = {c: _numbers(df[c])[0].astype("int64").to_numpy() for c in spec.outcomes.extra}
    # JSON has no NaN: a blank numeric feature is stored as null and imputed by the preprocessor.
    num = {c: [None if math.isnan(v) else float(v) for v in _numbers(df[c])[0].to_numpy()] for c in numeric}
    cat = {c: _texts(df[c]).tolist() for c in categorical}
    names = [*numeric, *categorical]
    values = [*num.values(), *cat.values()]
    return [
        dict(
            log_name=spec.name,
            customer_id=str(ids[i]),
            arm=str(arm.iat[i]),
            propensity=float(propensity.iat[i]),
            converted=int(converted[i]),
            revenue=float(revenue[i]),
            outcomes={c: int(v[i]) for c, v in extra.items()},
            features=dict(zip(names, (col[i] for col in values), strict=True)),
        )
        for i in range(len(df))
    ]


# --- reading logs back for training and allocation ---------------------------------------------------


def _log(session: Any, name: str) -> m.CampaignLog:
    log = session.get(m.CampaignLog, name)
    if log is None:
        known = sorted(session.execute(select(m.CampaignLog.name)).scalars())
        raise LookupError(
            f"the warehouse holds no campaign log named {name!r} (known: {known}); "
            "import one with `couponops import-log FILE --spec SPEC.yaml`"
        )
    return log


def log_arms_and_costs(engine: Engine, name: str) -> tuple[list[str], dict[str, float]]:
    """Return a log's arms (``"control"`` first, then the treated arms) and cost per treated customer.

    Raises:
        LookupError: No log of that name.
    """
    with session_scope(engine) as session:
        log = _log(session, name)
        costs = {str(a): float(c) for a, c in (log.arm_costs or {}).items()}
    return [CONTROL_ARM, *(a for a in costs if a != CONTROL_ARM)], costs


def log_feature_columns(engine: Engine, name: str) -> tuple[list[str], list[str]]:
    """Return a log's ``(numeric, categorical)`` feature columns.

    An imported log has its declared or inferred columns; a log ingested from a shop export is
    joined with the warehouse's point-in-time features (:mod:`mlpkg.features`).

    Raises:
        LookupError: No log of that name.
    """
    with session_scope(engine) as session:
        spec = dict(_log(session, name).spec or {})
    features = spec.get("features")
    if isinstance(features, dict) and "numeric" in features:
        return list(features["numeric"]), list(features.get("categorical", []))
    return list(NUMERIC_FEATURES), list(CATEGORICAL_FEATURES)


def training_columns(engine: Engine, frame: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    """Return the numeric features, categorical features and arms to train on a training frame.

    Args:
        engine: The warehouse.
        frame: The frame from :func:`mlpkg.data.training_frame` (with ``log_name`` and ``arm``).

    Returns:
        The logs' feature columns present in ``frame``, and ``"control"`` followed by the sorted
        declared arms that have rows (an arm without rows has nothing to learn from).

    Raises:
        ValueError: The frame mixes logs with different feature columns (an imported log and the
            shop's own, say); train on one kind at a time with ``--log``.
    """
    names = sorted(frame["log_name"].unique())
    columns = {n: log_feature_columns(engine, n) for n in names}
    first = columns[names[0]]
    differ = [n for n in names if columns[n] != first]
    if differ:
        raise ValueError(
            f"campaign logs {names[0]!r} and {differ} have different feature columns "
            f"({first} vs {columns[differ[0]]}); pick logs of one kind with --log"
        )
    declared = {a for n in names for a in log_arms_and_costs(engine, n)[0]}
    present = set(frame["arm"].astype("str").unique())
    undeclared = sorted(present - declared)
    if undeclared:
        raise ValueError(f"training rows hold arms {undeclared} that logs {names} do not declare")
    numeric = [c for c in first[0] if c in frame.columns]
    categorical = [c for c in first[1] if c in frame.columns]
    return numeric, categorical, [CONTROL_ARM, *sorted(present - {CONTROL_ARM})]
