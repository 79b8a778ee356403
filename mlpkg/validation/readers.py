"""Read raw batch files (CSV or Parquet) with the contract's declared column types.

Reading is the first half of the data contract: a file that cannot be turned into a typed frame
(empty, header only, truncated, not UTF-8, a required column missing, a value that does not parse)
raises :class:`~mlpkg.validation.contract.DataContractError` naming the file, the column, the rule
and the offending rows. Value rules (ranges, sets, uniqueness) are checked afterwards by the
expectation suites in :mod:`mlpkg.validation.suites`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from mlpkg.validation.contract import MAX_SAMPLE_ROWS, DataContractError, Failure, without_personal_data

ColumnKind = Literal["id", "str", "float", "int", "flag", "timestamp", "date"]

_KIND_WORDS: dict[str, str] = {
    "float": "a number",
    "int": "an integer",
    "flag": "an integer 0/1",
    "timestamp": "an ISO-8601 timestamp",
    "date": "an ISO-8601 date",
}


@dataclass(frozen=True)
class ColumnSpec:
    """One declared column of a raw table.

    Attributes:
        name: Column name.
        kind: ``id`` (non-empty string key), ``str``, ``float``, ``int``, ``flag`` (0/1),
            ``timestamp`` or ``date`` (both parsed to UTC ``datetime64``).
        empty_ok: For string columns: the empty string is a legal value (e.g. the coupon_id of an
            order without coupon) and is kept as ``""`` rather than turned into a null.
        nullable: For numeric/time columns: blanks are legal and become NaN/NaT.
    """

    name: str
    kind: ColumnKind
    empty_ok: bool = False
    nullable: bool = False


@dataclass(frozen=True)
class TableSchema:
    """Declared columns and natural key of one raw table.

    Attributes:
        name: Table name; also the file stem in a batch folder (``orders.csv``).
        columns: Required columns in their documented order.
        key: Natural key columns (unique together).
        default_format: File suffix the simulator writes (``.csv`` or ``.parquet``).
    """

    name: str
    columns: tuple[ColumnSpec, ...]
    key: tuple[str, ...]
    default_format: str = ".csv"

    @property
    def column_names(self) -> list[str]:
        """Return the declared column names in order."""
        return [c.name for c in self.columns]

    def column(self, name: str) -> ColumnSpec:
        """Return the spec of column ``name``."""
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"table {self.name} declares no column {name!r}")


def _cols(*specs: tuple) -> tuple[ColumnSpec, ...]:
    return tuple(ColumnSpec(*s) for s in specs)


#: The raw tables of a batch folder (see the shared contract for their meaning).
RAW_SCHEMAS: dict[str, TableSchema] = {
    s.name: s
    for s in (
        TableSchema(
            "customers",
            _cols(("customer_id", "id"), ("signup_date", "date"), ("region", "str"),
                  ("device", "str"), ("segment", "str")),
            key=("customer_id",),
        ),
        # Personal data: read by delivery only, never by features, training or MLflow.
        TableSchema(
            "contacts",
            _cols(("customer_id", "id"), ("email", "str", True), ("phone", "str", True),
                  ("push_token", "str", True), ("updated_at", "timestamp")),
            key=("customer_id",),
        ),
        TableSchema(
            "consent",
            _cols(("customer_id", "id"), ("channel", "str"), ("opted_in", "flag"),
                  ("updated_at", "timestamp")),
            key=("customer_id", "channel", "updated_at"),
        ),
        TableSchema(
            "channels",
            _cols(("channel", "id"), ("send_cost", "float"), ("daily_capacity", "int")),
            key=("channel",),
        ),
        TableSchema(
            "coupons",
            _cols(("coupon_id", "id"), ("kind", "str"), ("face_value", "float"), ("min_basket", "float"),
                  ("inventory", "int"), ("valid_from", "timestamp"), ("valid_to", "timestamp")),
            key=("coupon_id",),
        ),
        TableSchema(
            "events",
            _cols(("event_id", "id"), ("customer_id", "id"), ("ts", "timestamp"), ("event_type", "str"),
                  ("category", "str", True)),
            key=("event_id",),
            default_format=".parquet",
        ),
        TableSchema(
            "orders",
            _cols(("order_id", "id"), ("customer_id", "id"), ("ts", "timestamp"), ("revenue", "float"),
                  ("n_items", "int"), ("coupon_id", "str", True)),
            key=("order_id",),
        ),
        TableSchema(
            "campaign_log",
            _cols(("campaign_id", "id"), ("customer_id", "id"), ("arm", "str"), ("coupon_id", "str", True),
                  ("channel", "str", True), ("propensity", "float"), ("policy", "str"),
                  ("sent_at", "timestamp"), ("opened", "flag"), ("clicked", "flag"), ("converted", "flag"),
                  ("redeemed", "flag"), ("revenue", "float"), ("coupon_cost", "float")),
            key=("campaign_id", "customer_id"),
        ),
        TableSchema(
            "feedback",
            _cols(("event_id", "id"), ("campaign_id", "id"), ("customer_id", "id"), ("event_type", "str"),
                  ("ts", "timestamp"), ("coupon_id", "str", True), ("channel", "str", True),
                  ("order_id", "str", True), ("revenue", "float", False, True)),
            key=("event_id",),
        ),
    )
}

#: File suffixes a batch may use for a raw table.
SUPPORTED_SUFFIXES = (".csv", ".parquet")


def _fail(path: Path, failures: list[Failure], headline: str) -> DataContractError:
    details = "\n".join(f"  - {f.describe()}" for f in failures)
    return DataContractError(f"{path.name} ({path}): {headline}\n{details}", failures=failures)


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        line_start = data.rfind(b"\n", 0, err.start) + 1
        snippet = data[max(line_start, err.start - 20): err.start + 10]
        failure = Failure(
            "utf8_encoding",
            None,
            f"file must be UTF-8; byte 0x{data[err.start]:02x} at byte offset {err.start} "
            f"(line {line}, column {err.start - line_start + 1}) is not valid UTF-8 near {snippet!r}",
            1,
            [{"_line": line, "byte_offset": err.start}],
        )
        raise _fail(path, [failure], "not valid UTF-8") from None
    # Spreadsheet exports often start with a byte-order mark; it is not part of the first name.
    return text.removeprefix("\ufeff")


def _field_count_problems(text: str, n_columns: int) -> list[tuple[int, int]]:
    """Return (line number, field count) of records whose field count differs from the header.

    pandas' C parser silently pads short rows (a truncated last line reads as blanks), so the
    count is checked here. Files without quotes take a fast path that counts delimiters per line.
    """
    problems: list[tuple[int, int]] = []
    if '"' not in text:
        # split("\n"), not splitlines(): the latter also breaks at \x0b, \u2028 and friends
        # inside values, which the CSV parser does not.
        for i, line in enumerate(text.split("\n"), start=1):
            if line.strip() == "":
                continue
            n = line.count(",") + 1
            if n != n_columns:
                problems.append((i, n))
        return problems
    reader = csv.reader(io.StringIO(text, newline=""))
    for row in reader:
        if not row:
            continue
        if len(row) != n_columns:
            problems.append((reader.line_num, len(row)))
    return problems


def _read_csv(path: Path, data: bytes) -> tuple[pd.DataFrame, int]:
    """Return the raw all-string frame and the offset from data row to file line."""
    text = _decode(path, data)
    if not text.strip():
        raise _fail(path, [Failure("not_empty", None, "file holds only whitespace, no header", 0)],
                    "file is empty")
    try:
        raw = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.ParserError as err:
        failure = Failure("csv_structure", None, f"CSV cannot be parsed: {err}", 1)
        raise _fail(path, [failure], "malformed CSV (unterminated quote or extra fields)") from None
    header = list(raw.columns)
    problems = _field_count_problems(text, len(header))
    if problems:
        lines = ", ".join(f"line {ln} has {n}" for ln, n in problems[:MAX_SAMPLE_ROWS])
        failure = Failure(
            "csv_field_count",
            None,
            f"every record must have {len(header)} fields like the header; {lines} "
            "(truncated or malformed line)",
            len(problems),
            [{"_line": ln, "fields": n} for ln, n in problems[:MAX_SAMPLE_ROWS]],
        )
        raise _fail(path, [failure], "truncated or malformed record(s)")
    # Line of data row 0 is 2 (the header is line 1), assuming one physical line per record.
    return raw, 2


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several unrelated types for a damaged file
        failure = Failure("parquet_readable", None, f"file is not readable Parquet: {err}", 1)
        raise _fail(path, [failure], "unreadable Parquet file") from None


def _is_text(s: pd.Series) -> bool:
    return pd.api.types.is_string_dtype(s.dtype) or s.dtype == object


def _blank(s: pd.Series) -> pd.Series:
    if _is_text(s):
        return s.isna() | (s.astype(str).str.strip() == "")
    return s.isna()


def _coerce(raw: pd.Series, spec: ColumnSpec) -> tuple[pd.Series, pd.Series]:
    """Return the typed column and a mask of values that did not parse."""
    blank = _blank(raw)
    if spec.kind in ("id", "str"):
        text = raw.astype("str") if not _is_text(raw) else raw
        if spec.empty_ok:
            out = text.where(~blank, "")
        else:
            out = text.where(~blank, None)
        return out.astype("str"), pd.Series(False, index=raw.index)
    if spec.kind in ("timestamp", "date"):
        if pd.api.types.is_datetime64_any_dtype(raw.dtype):
            out = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
            return out, pd.Series(False, index=raw.index)
        out = pd.to_datetime(raw.astype("str").str.strip().where(~blank), utc=True, errors="coerce",
                             format="ISO8601")
        return out, out.isna() & ~blank
    # Numeric kinds.
    if pd.api.types.is_bool_dtype(raw.dtype):
        num = raw.astype("float64")
    elif _is_text(raw):
        num = pd.to_numeric(raw.astype("str").str.strip().where(~blank), errors="coerce").astype("float64")
    else:
        num = raw.astype("float64")
    bad = num.isna() & ~blank
    if spec.kind in ("int", "flag"):
        integral = np.isfinite(num) & (num == np.floor(num))
        bad = bad | (num.notna() & ~integral)
        num = num.where(~bad)
        if num.notna().all():
            return num.astype("int64"), bad
        # Blanks stay NaN in a float column: GX 1.x mis-evaluates value sets on nullable Int64.
        return num, bad
    return num, bad


def _coerce_frame(path: Path, schema: TableSchema, raw: pd.DataFrame,
                  line_offset: int | None) -> pd.DataFrame:
    out = {}
    failures: list[Failure] = []
    for spec in schema.columns:
        typed, bad = _coerce(raw[spec.name], spec)
        out[spec.name] = typed
        n_bad = int(bad.sum())
        if n_bad:
            idx = list(raw.index[bad.to_numpy()][:MAX_SAMPLE_ROWS])
            samples = []
            for i in idx:
                row = {"_row": int(i)}
                if line_offset is not None:
                    row["_line"] = int(i) + line_offset
                row.update({c: raw.at[i, c] for c in raw.columns})
                samples.append(row)
            where = ", ".join(
                (f"line {s['_line']}" if "_line" in s else f"row {s['_row']}") + f" = {s[spec.name]!r}"
                for s in samples
            )
            failures.append(without_personal_data(Failure(
                f"parse_{spec.kind}",
                spec.name,
                f"values in '{spec.name}' must parse as {_KIND_WORDS[spec.kind]}; bad: {where}",
                n_bad,
                samples,
            ), schema.name))
    if failures:
        raise _fail(path, failures, f"{len(failures)} column(s) hold values of the wrong type")
    frame = pd.DataFrame(out, index=raw.index)
    # Unexpected extra columns travel along untouched; the gate reports them (warning or error).
    for col in raw.columns:
        if col not in out:
            frame[col] = raw[col]
    return frame.reset_index(drop=True)


def read_table(path: Path, table: str, *, strict: bool = False, allow_empty: bool = False) -> pd.DataFrame:
    """Read one raw file into a frame with the contract's column types.

    Args:
        path: A ``.csv`` (UTF-8, header row) or ``.parquet`` file.
        table: Raw table name, a key of :data:`RAW_SCHEMAS`.
        strict: Raise on columns the contract does not declare (otherwise they are kept and the
            gate reports them as warnings).
        allow_empty: Accept a file with a header but no rows.

    Returns:
        The frame: ids and strings as ``str``, numbers as float64/int64 (float64 when an integer
        column has blanks, which the not-null rule then reports), timestamps and dates as UTC
        ``datetime64``; declared columns first, then any extra columns as raw strings.

    Raises:
        DataContractError: The file is empty, header-only, truncated, not UTF-8, lacks a required
            column, holds a value that does not parse, or (strict) has an extra column.
    """
    path = Path(path)
    if table not in RAW_SCHEMAS:
        raise ValueError(f"unknown raw table {table!r}; expected one of {sorted(RAW_SCHEMAS)}")
    schema = RAW_SCHEMAS[table]
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise _fail(path, [Failure("file_type", None, f"suffix {suffix!r} is not one of "
                                   f"{SUPPORTED_SUFFIXES}", 1)], "unsupported file type")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, [Failure("not_empty", None, "file is empty (0 bytes); expected a header row "
                                   f"with {schema.column_names}", 0)], "file is empty (0 bytes)")
    if suffix == ".csv":
        raw, line_offset = _read_csv(path, path.read_bytes())
    else:
        raw, line_offset = _read_parquet(path), None
    columns = [str(c) for c in raw.columns]
    raw.columns = columns
    failures = [
        Failure("required_column", c, f"required column '{c}' is missing (file has {columns})", 1)
        for c in schema.column_names if c not in columns
    ]
    extra = [c for c in columns if c not in schema.column_names]
    if strict:
        failures += [
            Failure("unexpected_column", c, f"column '{c}' is not in the {table} contract (strict mode)", 1)
            for c in extra
        ]
    if failures:
        raise _fail(path, failures, f"columns do not match the {table} contract")
    if len(raw) == 0 and not allow_empty:
        raise _fail(path, [Failure("not_empty", None, "file has a header but no data rows", 0)],
                    "header only, no data rows")
    return _coerce_frame(path, schema, raw, line_offset)


def find_table_files(batch_dir: Path) -> tuple[dict[str, Path], list[Path]]:
    """Map raw table names to their files in ``batch_dir``.

    Args:
        batch_dir: A batch folder.

    Returns:
        ``(tables, others)``: the file of each recognised table, and files that belong to no
        raw table (hidden files are ignored).

    Raises:
        DataContractError: A table is present twice (e.g. both ``orders.csv`` and ``orders.parquet``).
    """
    tables: dict[str, Path] = {}
    others: list[Path] = []
    for p in sorted(Path(batch_dir).iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.stem in RAW_SCHEMAS and p.suffix.lower() in SUPPORTED_SUFFIXES:
            if p.stem in tables:
                failure = Failure("one_file_per_table", None,
                                  f"table {p.stem} appears twice: {tables[p.stem].name} and {p.name}", 2)
                raise _fail(p, [failure], "ambiguous batch")
            tables[p.stem] = p
        else:
            others.append(p)
    return tables, others
