"""Read raw batch files (CSV, gzip-compressed CSV or Parquet) with the contract's declared column types.

Reading is the first half of the data contract: a file that cannot be turned into a typed frame
raises :class:`~mlpkg.validation.contract.DataContractError` naming the file, the line (counting
the header and any newlines inside quoted fields), the column, the rule and the value as the file
has it. Value rules (ranges, sets, uniqueness) are checked afterwards by the expectation suites in
:mod:`mlpkg.validation.suites`.

What reading refuses, besides empty, header-only, truncated and non-UTF-8 files:

* **Identifiers are exact strings.** CSV values are never converted; a Parquet id column stored
  as a number is a type error (``100000.0`` is not the id ``100000``, and a number cannot keep
  leading zeros). Ids (``*_id`` columns and channels) with leading/trailing whitespace, control
  characters or invisible characters (zero-width, byte-order mark, no-break space, bidi marks)
  are refused, never normalised: ``"C1 "`` would otherwise become a second customer.
* **Text** longer than its warehouse column (read from :mod:`mlpkg.db.models`) and NUL bytes
  anywhere (PostgreSQL rejects both) are refused.
* **Numbers**: ``nan``/``inf`` written as text, overflowing values (``1e999``), integers outside
  their warehouse column's range and values that a float would change (more than 15 significant
  digits that do not survive the round trip) are refused.
* **Timestamps** are ISO-8601 text (``YYYY-MM-DD[THH:MM[:SS[.f]]][Z|+HH:MM]``) or Parquet
  timestamps; a number is not a date. A value without a zone is taken as UTC (the contract of
  every raw table), but a column mixing values with and without a zone is refused, and one with
  several different offsets is reported as a warning (each value is converted exactly).
* **CSV headers** must name each column once (pandas would silently rename a second ``x`` to
  ``x.1``, turning, say, an outcome into a feature).

:func:`scan_batch` lists a batch folder: table files are matched case-insensitively
(``orders.CSV``), ``.csv.gz`` is read, and symbolic links, two files of one table, other
compressed or archive files and table files in an unsupported format are refused before anything
is read. Other files are reported as warnings (not read). :func:`resolve_batch_folder` refuses a
batch folder that is the working directory, ``/``, the home folder, the state folder or one of
their ancestors, before anything is moved.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import unicodedata
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from mlpkg.validation.contract import (
    MAX_SAMPLE_ROWS,
    DataContractError,
    Failure,
    LineMap,
    plain_value,
    without_personal_data,
)

ColumnKind = Literal["id", "str", "float", "int", "flag", "timestamp", "date"]

_KIND_WORDS: dict[str, str] = {
    "float": "a number",
    "int": "an integer",
    "flag": "an integer 0/1",
    "timestamp": "an ISO-8601 timestamp (YYYY-MM-DDTHH:MM:SSZ)",
    "date": "an ISO-8601 date (YYYY-MM-DD)",
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
        optional: The file may leave the column out (a column added to the contract later, such
            as ``product_id`` of events and orders): a file without it reads as if every value
            were empty, so exports made before the column existed stay valid.
    """

    name: str
    kind: ColumnKind
    empty_ok: bool = False
    nullable: bool = False
    optional: bool = False


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

    @property
    def required_names(self) -> list[str]:
        """Return the columns every file must carry (the declared ones that are not optional)."""
        return [c.name for c in self.columns if not c.optional]

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
        # The shop's product catalogue: a snapshot, the newer price and stock replace the older.
        TableSchema(
            "products",
            _cols(("product_id", "id"), ("category", "str"), ("price", "float"), ("in_stock", "flag")),
            key=("product_id",),
        ),
        TableSchema(
            "events",
            _cols(("event_id", "id"), ("customer_id", "id"), ("ts", "timestamp"), ("event_type", "str"),
                  ("category", "str", True), ("product_id", "str", True, False, True)),
            key=("event_id",),
            default_format=".parquet",
        ),
        TableSchema(
            "orders",
            _cols(("order_id", "id"), ("customer_id", "id"), ("ts", "timestamp"), ("revenue", "float"),
                  ("n_items", "int"), ("coupon_id", "str", True), ("product_id", "str", True, False, True)),
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


# --- warehouse limits -----------------------------------------------------------------------------

#: Warehouse table of each raw table, and columns stored elsewhere (raw column -> (table, column)).
_WAREHOUSE_TABLES: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "customers": ("customers", {}),
    "contacts": ("contacts", {}),
    "consent": ("consent", {}),
    "channels": ("channels", {}),
    "coupons": ("coupons", {}),
    "products": ("products", {}),
    "events": ("events", {}),
    "orders": ("orders", {}),
    "campaign_log": ("campaign_log_rows", {"campaign_id": ("campaign_logs", "name")}),
    "feedback": ("feedback_events", {}),
}


def _warehouse_limits() -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], tuple[int, int]]]:
    """Return the string length and the integer range of every raw column the warehouse stores."""
    from sqlalchemy import BigInteger, Integer, SmallInteger, String

    from mlpkg.db.models import Base

    lengths: dict[tuple[str, str], int] = {}
    ranges: dict[tuple[str, str], tuple[int, int]] = {}
    for raw_table, (stored, moved) in _WAREHOUSE_TABLES.items():
        for spec in RAW_SCHEMAS[raw_table].columns:
            table_name, column_name = moved.get(spec.name, (stored, spec.name))
            column = Base.metadata.tables[table_name].columns.get(column_name)
            if column is None:
                continue
            kind = column.type
            if isinstance(kind, String) and kind.length:
                lengths[(raw_table, spec.name)] = int(kind.length)
            elif isinstance(kind, Integer):
                # PostgreSQL's INTEGER is 32-bit; SQLite would take more, production would not.
                bits = 64 if isinstance(kind, BigInteger) else 16 if isinstance(kind, SmallInteger) else 32
                ranges[(raw_table, spec.name)] = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return lengths, ranges


#: Longest value (characters) of each text column, and the range of each integer column, as the
#: warehouse stores them: ``(table, column) -> limit``.
MAX_LENGTHS, INTEGER_RANGES = _warehouse_limits()
_INT64 = (-(2**63), 2**63 - 1)
#: Largest integer a float64 holds exactly.
_EXACT_FLOAT_INT = 2**53


# --- file names -----------------------------------------------------------------------------------

#: File formats a raw table may come in (the name ends with one of these, in any letter case).
TABLE_FORMATS: dict[str, str] = {".csv.gz": "csv.gz", ".csv": "csv", ".parquet": "parquet"}
#: File suffixes a batch (or a campaign log) may use.
SUPPORTED_SUFFIXES = tuple(TABLE_FORMATS)
#: Endings of compressed files and archives: read only as ``.csv.gz``, refused otherwise.
COMPRESSED_SUFFIXES = frozenset({
    ".gz", ".gzip", ".zip", ".bz2", ".xz", ".lzma", ".zst", ".zstd", ".lz4", ".br", ".7z", ".rar",
    ".tar", ".tgz", ".tbz2", ".txz", ".z", ".sz", ".snappy",
})
#: The landing zone's completeness marker, copied along with a batch.
MARKER_FILES = frozenset({"_SUCCESS"})


def file_format(path: Path | str) -> str | None:
    """Return ``csv``, ``csv.gz`` or ``parquet`` for a supported file name (any letter case), else None."""
    name = Path(path).name.lower()
    for suffix, fmt in TABLE_FORMATS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return fmt
    return None


def table_of(path: Path | str) -> str | None:
    """Return the raw table a file name stands for (``Orders.CSV`` -> ``orders``), or None."""
    name = Path(path).name.lower()
    for suffix in TABLE_FORMATS:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return stem if stem in RAW_SCHEMAS else None
    return None


def file_refusal(path: Path, failures: list[Failure], headline: str) -> DataContractError:
    """Return the error that refuses one file: its name and path, a headline and every failure."""
    details = "\n".join(f"  - {f.describe()}" for f in failures)
    return DataContractError(f"{path.name} ({path}): {headline}\n{details}", failures=failures)


_fail = file_refusal


# --- batch folders ---------------------------------------------------------------------------------


@dataclass
class BatchScan:
    """What a batch folder holds, found without reading any file.

    Attributes:
        tables: The file of each raw table.
        others: Files that belong to no raw table (reported as warnings, not read).
        failures: File-level refusals (symbolic links, two files of one table, unsupported or
            compressed data files); any of them rejects the batch before a file is read.
        warnings: One line per file or folder that is not read.
    """

    tables: dict[str, Path] = field(default_factory=dict)
    others: list[Path] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _file_failure(rule: str, entry: Path, text: str) -> Failure:
    return Failure(rule, None, f"{entry.name}: {text}", 1, [{"file": entry.name}])


def scan_batch(batch_dir: Path) -> BatchScan:
    """List the files of a batch folder and refuse the ones that cannot be read safely.

    Table files are matched case-insensitively (``orders.csv``, ``Orders.CSV``, ``orders.csv.gz``,
    ``orders.parquet``). Nothing is opened: a symbolic link is refused whatever it points to.

    Args:
        batch_dir: A batch folder.

    Returns:
        The scan; ``failures`` is empty when every file can be read.
    """
    scan = BatchScan()
    for entry in sorted(Path(batch_dir).iterdir()):
        name = entry.name
        lower = name.lower()
        suffixes = {s.lower() for s in Path(lower).suffixes}
        if entry.is_symlink():
            target = os.readlink(entry)
            scan.failures.append(_file_failure(
                "no_symlinks", entry,
                f"is a symbolic link (to {target}); a batch holds regular files only, and links are "
                "neither followed nor copied"))
            continue
        if name in MARKER_FILES:
            continue
        first = lower.split(".", 1)[0]
        if entry.is_dir():
            if first in RAW_SCHEMAS:
                scan.failures.append(_file_failure(
                    "table_is_a_file", entry,
                    f"is a folder named after table {first}; write the table as one file "
                    f"({', '.join(first + s for s in SUPPORTED_SUFFIXES)})"))
            else:
                scan.warnings.append(f"{name}/: a folder inside the batch (not read)")
            continue
        if not entry.is_file():
            scan.failures.append(_file_failure("regular_file", entry, "is not a regular file"))
            continue
        table = table_of(entry)
        if table is not None:
            if name.startswith("."):
                scan.warnings.append(f"{name}: hidden file (not read); name it {name[1:]} to load it")
                scan.others.append(entry)
            elif table in scan.tables:
                scan.failures.append(Failure(
                    "one_file_per_table", None,
                    f"table {table} appears twice: {scan.tables[table].name} and {name} (file names "
                    "are matched ignoring letter case); keep one file per table", 2,
                    [{"file": scan.tables[table].name}, {"file": name}]))
            else:
                scan.tables[table] = entry
            continue
        if first in RAW_SCHEMAS and not name.startswith("."):
            scan.failures.append(_file_failure(
                "supported_format", entry,
                f"looks like table {first} but is not in a supported format; use one of "
                f"{', '.join(first + s for s in SUPPORTED_SUFFIXES)}"))
        elif suffixes & COMPRESSED_SUFFIXES:
            scan.failures.append(_file_failure(
                "compressed_file", entry,
                "is a compressed file or archive; only <table>.csv.gz is read (and Parquet's own "
                "compression): unpack it into the batch folder or remove it"))
        else:
            scan.others.append(entry)
            scan.warnings.append(f"{name}: not a raw table of the contract (not read)")
    return scan


def find_table_files(batch_dir: Path) -> tuple[dict[str, Path], list[Path]]:
    """Map raw table names to their files in ``batch_dir``.

    Args:
        batch_dir: A batch folder.

    Returns:
        ``(tables, others)``: the file of each recognised table, and files that belong to no
        raw table.

    Raises:
        DataContractError: A file is refused by :func:`scan_batch` (a symbolic link, a table
            present twice, an unsupported or compressed data file).
    """
    scan = scan_batch(batch_dir)
    if scan.failures:
        raise _fail(Path(batch_dir), scan.failures, "batch files refused before reading")
    return scan.tables, scan.others


def resolve_batch_folder(batch_dir: Path | str, *, protected: Iterable[Path | str] = ()) -> Path:
    """Return the real path of a batch folder, refusing one that must never be moved to quarantine.

    A rejected batch is moved away whole, so the folder must not be (or contain) the caller's
    working directory, ``/``, the home folder or any ``protected`` folder (the state folder, the
    quarantine): ``couponops ingest .`` or ``batch/..`` would otherwise move the caller's own files.
    The check runs on the resolved path, so ``..`` components cannot get around it.

    Args:
        batch_dir: The folder as given.
        protected: Further folders that neither the batch nor any folder above it may be.

    Returns:
        The resolved folder.

    Raises:
        FileNotFoundError: The folder does not exist.
        DataContractError: The folder is a symbolic link or one of the folders above; nothing was
            read or moved.
    """
    given = Path(batch_dir)
    if given.is_symlink():
        target = os.readlink(given)
        raise _refuse_folder(given, given, f"is a symbolic link (to {target}); give the real folder")
    if not given.is_dir():
        raise FileNotFoundError(f"batch folder {given} does not exist")
    real = given.resolve()
    guarded = [("the working directory", Path.cwd()), ("the home folder", Path.home()), ("/", Path("/"))]
    guarded += [(f"the protected folder {p}", Path(p)) for p in protected]
    for what, folder in guarded:
        try:
            folder = folder.expanduser().resolve()
        except OSError:
            continue
        if folder == real:
            raise _refuse_folder(given, real, f"is {what}")
        if folder.is_relative_to(real):
            raise _refuse_folder(given, real, f"contains {what} ({folder})")
    return real


def _refuse_folder(given: Path, real: Path, why: str) -> DataContractError:
    text = (f"batch folder '{given}' ({real}) {why}; a rejected batch is moved to quarantine whole, "
            "so give the path of one batch folder (nothing was read or moved)")
    failure = Failure("batch_folder_safe", None, text, 1, [{"folder": str(given), "resolved": str(real)}])
    return DataContractError(f"{text}\n  - {failure.describe()}", failures=[failure])


# --- CSV --------------------------------------------------------------------------------------------


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


def _gunzip(path: Path, data: bytes) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        failure = Failure("gzip_readable", None, f"file is not readable gzip: {err}", 1)
        raise _fail(path, [failure], "unreadable .gz file") from None


def _records(text: str, n_columns: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Return the first line of every data record, and (line, field count) of malformed records.

    pandas' C parser silently pads short rows (a truncated last line reads as blanks), so the
    count is checked here. Records start where the previous one ended, so a quoted field holding
    newlines moves every later line number. Files without quotes take a fast path.
    """
    starts: list[int] = []
    problems: list[tuple[int, int]] = []
    if '"' not in text:
        # split("\n"), not splitlines(): the latter also breaks at \x0b, \u2028 and friends
        # inside values, which the CSV parser does not.
        seen_header = False
        for i, line in enumerate(text.split("\n"), start=1):
            if line.strip() == "":
                continue
            if not seen_header:
                seen_header = True
                continue
            starts.append(i)
            n = line.count(",") + 1
            if n != n_columns:
                problems.append((i, n))
        return starts, problems
    reader = csv.reader(io.StringIO(text, newline=""))
    first = True
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error:
            problems.append((start, -1))
            break
        if not row:
            continue
        if first:
            first = False
            continue
        starts.append(start)
        if len(row) != n_columns:
            problems.append((start, len(row)))
    return starts, problems


def _header(text: str) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(text, newline="")))
    except (StopIteration, csv.Error):
        return []


def _read_csv(path: Path, data: bytes) -> tuple[pd.DataFrame, int | LineMap]:
    """Return the raw all-string frame and the line of each data row (an offset, or a map)."""
    text = _decode(path, data)
    if not text.strip():
        raise _fail(path, [Failure("not_empty", None, "file holds only whitespace, no header", 0)],
                    "file is empty")
    header = _header(text)
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(header, start=1):
        seen.setdefault(name, []).append(i)
    dups = {name: pos for name, pos in seen.items() if len(pos) > 1}
    if dups:
        failures = [Failure(
            "csv_unique_header", name,
            f"the header names column '{name}' {len(pos)} times (fields {pos} of line 1); each column "
            "must appear once (a second copy would be read as another column)", len(pos) - 1,
            [{"_line": 1, "header": ",".join(header)}])
            for name, pos in dups.items()]
        raise _fail(path, failures, "duplicated column name(s) in the header")
    try:
        raw = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.ParserError as err:
        failure = Failure("csv_structure", None, f"CSV cannot be parsed: {err}", 1)
        raise _fail(path, [failure], "malformed CSV (unterminated quote or extra fields)") from None
    starts, problems = _records(text, len(raw.columns))
    if problems:
        lines = ", ".join(f"line {ln} has {n}" if n >= 0 else f"line {ln} cannot be parsed"
                          for ln, n in problems[:MAX_SAMPLE_ROWS])
        failure = Failure(
            "csv_field_count",
            None,
            f"every record must have {len(raw.columns)} fields like the header; {lines} "
            "(truncated or malformed line)",
            len(problems),
            [{"_line": ln, "fields": n} for ln, n in problems[:MAX_SAMPLE_ROWS]],
        )
        raise _fail(path, [failure], "truncated or malformed record(s)")
    header_nul = [name for name in raw.columns if "\x00" in str(name)]
    if header_nul:
        failure = Failure("no_nul_bytes", header_nul[0], f"the header holds a NUL byte: {header_nul[0]!r}", 1,
                          [{"_line": 1}])
        raise _fail(path, [failure], "NUL byte in the header")
    if len(starts) == len(raw) and starts == list(range(2, 2 + len(raw))):
        return raw, 2
    if len(starts) != len(raw):  # pragma: no cover - both parsers agree on well-formed files
        return raw, 2
    return raw, LineMap(starts)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several unrelated types for a damaged file
        failure = Failure("parquet_readable", None, f"file is not readable Parquet: {err}", 1)
        raise _fail(path, [failure], "unreadable Parquet file") from None


# --- values ----------------------------------------------------------------------------------------


def _is_text(s: pd.Series) -> bool:
    return pd.api.types.is_string_dtype(s.dtype) or s.dtype == object


def _blank(s: pd.Series) -> pd.Series:
    if _is_text(s):
        return s.isna() | (s.astype(str).str.strip() == "")
    return s.isna()


# ASCII and C1 control characters; other invisible characters are found by Unicode category.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Characters that render as nothing although their category is a letter or a mark.
_INVISIBLE_LETTERS = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u3164\uffa0"
                               "\ufe00\ufe01\ufe02\ufe03\ufe04\ufe05\ufe06\ufe07\ufe08\ufe09\ufe0a\ufe0b"
                               "\ufe0c\ufe0d\ufe0e\ufe0f")
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})


def _has_invisible(value: str) -> bool:
    """Return whether a non-ASCII value holds a control, format, private or non-ASCII space character."""
    return any(
        ord(ch) > 0x7E and (ch in _INVISIBLE_LETTERS or unicodedata.category(ch) in _INVISIBLE_CATEGORIES)
        for ch in value
    )


def _non_text(raw: pd.Series) -> pd.Series:
    """Return a mask of values that are neither text nor missing (Parquet: bytes, numbers in objects)."""
    if pd.api.types.is_string_dtype(raw.dtype) and raw.dtype != object:
        return pd.Series(False, index=raw.index)
    return raw.map(lambda v: not (v is None or isinstance(v, str) or (isinstance(v, float) and v != v)))


def _exact_integer_text(raw: pd.Series) -> pd.Series:
    """Return an integer-typed (Parquet) column as exact decimal text; other columns unchanged.

    An integer converts exactly (``100000`` -> ``"100000"``), so integer ids are accepted. A float
    id column is not converted: ``100000.0`` may have been ``"100000"`` or ``"0100000"`` and may
    already have lost digits, so it stays a type error.
    """
    if pd.api.types.is_integer_dtype(raw.dtype) and not pd.api.types.is_bool_dtype(raw.dtype):
        as_text = raw.astype("object").map(lambda v: None if v is pd.NA or v is None else str(int(v)))
        return as_text.astype("str")
    return raw


def _is_identifier(spec: ColumnSpec) -> bool:
    return spec.kind == "id" or spec.name.endswith("_id") or spec.name == "channel"


@dataclass
class _Problem:
    rule: str
    text: str
    mask: pd.Series
    warning: bool = False


def _text_problems(table: str, spec: ColumnSpec, text: pd.Series, *,
                   max_length: int | None = None) -> list[_Problem]:
    """Return the hygiene problems of a text column (values as the file has them)."""
    present = text.notna()
    values = text.where(present, "").astype("str")
    out: list[_Problem] = []
    nul = present & values.str.contains("\x00", regex=False)
    out.append(_Problem("no_nul_bytes", f"'{spec.name}' must not contain NUL bytes (\\x00)", nul))
    limit = max_length or MAX_LENGTHS.get((table, spec.name))
    if limit:
        out.append(_Problem(
            "max_length",
            f"'{spec.name}' must be at most {limit} characters (the warehouse column's length)",
            present & (values.str.len() > limit)))
    if _is_identifier(spec):
        padded = present & (values != values.str.strip()) & (values.str.strip() != "")
        out.append(_Problem(
            "id_no_surrounding_whitespace",
            f"'{spec.name}' is an identifier and must not start or end with whitespace (ids are exact)",
            padded))
        non_ascii = values.str.contains(r"[^\x20-\x7e]", regex=True)
        # Only the (rare) non-ASCII values need the per-character Unicode look-up.
        hidden = pd.Series(False, index=values.index)
        if non_ascii.any():
            hidden[non_ascii] = values[non_ascii].map(_has_invisible).astype(bool)
        invisible = present & ~nul & (values.str.contains(_CONTROL.pattern, regex=True) | hidden)
        out.append(_Problem(
            "id_visible_characters",
            f"'{spec.name}' is an identifier and must not contain control or invisible characters "
            "(zero-width, byte-order mark, no-break space, bidi marks)",
            invisible & ~padded))
    return out


# Date, optional time, optional zone (Z, +HH, +HHMM, +HH:MM); nothing else is a timestamp.
_ISO = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[Tt ](?P<time>\d{2}:\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?)(?P<zone>[Zz]|[+-]\d{2}(?::?\d{2})?)?)?$"
)


def _coerce_time(raw: pd.Series, spec: ColumnSpec, blank: pd.Series) -> tuple[pd.Series, list[_Problem]]:
    word = _KIND_WORDS[spec.kind]
    if pd.api.types.is_datetime64_any_dtype(raw.dtype):
        out = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
        return out, []
    if not _is_text(raw):
        out = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[us, UTC]")
        return out, [_Problem(f"parse_{spec.kind}",
                              f"values in '{spec.name}' must parse as {word}; the column is stored as "
                              f"{raw.dtype}, and a number is not a date", ~blank)]
    text = raw.astype("str").str.strip()
    parts = text.where(~blank, "").str.extract(_ISO)
    well_formed = parts["date"].notna()
    out = pd.to_datetime(text.where(~blank & well_formed), utc=True, errors="coerce", format="ISO8601")
    bad = ~blank & out.isna()
    problems = [_Problem(f"parse_{spec.kind}", f"values in '{spec.name}' must parse as {word}", bad)]
    ok = ~blank & ~bad
    zone = parts["zone"].fillna("").str.upper()
    zoned = ok & (zone != "")
    if spec.kind == "timestamp":
        unzoned = ok & (zone == "")
    else:  # a plain date has no zone; only times without one are ambiguous next to zoned ones
        unzoned = ok & (zone == "") & parts["time"].notna()
    if zoned.any() and unzoned.any():
        example = text[zoned].iloc[0]
        problems.append(_Problem(
            "timestamp_zone_consistent",
            f"'{spec.name}' mixes values with a zone (e.g. {example!r}) and values without one; a value "
            "without a zone is taken as UTC only when the whole column has none: write every value "
            "with its zone", unzoned))
    offsets = zone[zoned].replace({"Z": "+00:00"}).map(_normal_offset)
    if offsets.nunique() > 1:
        shown = sorted(offsets.unique())[:MAX_SAMPLE_ROWS]
        first_offset = offsets.iloc[0]
        problems.append(_Problem(
            "timestamp_offsets_mixed",
            f"'{spec.name}' holds several UTC offsets {shown}; each value was converted to UTC exactly",
            zoned & (zone.replace({"Z": "+00:00"}).map(_normal_offset) != first_offset), warning=True))
    return out, problems


def _normal_offset(zone: str) -> str:
    digits = zone[1:].replace(":", "")
    digits = (digits + "00")[:4]
    return f"{zone[0]}{digits[:2]}:{digits[2:]}"


_NON_FINITE_WORDS = frozenset({"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity",
                               "-infinity", "snan"})
_EXACT_INT = re.compile(r"^[+-]?\d+(?:\.0*)?$")


def _loses_precision(text: str) -> bool:
    """Return whether a float would change the number written as ``text``."""
    try:
        exact = Decimal(text)
        return Decimal(repr(float(text))) != exact
    except (InvalidOperation, ValueError, OverflowError):
        return False


def _out_of_range(text: str, lo: int, hi: int) -> bool:
    return not lo <= int(text.split(".", 1)[0]) <= hi


def _coerce_number(raw: pd.Series, spec: ColumnSpec, blank: pd.Series,
                   bounds: tuple[int, int]) -> tuple[pd.Series, list[_Problem]]:
    name, word = spec.name, _KIND_WORDS[spec.kind]
    integer = spec.kind in ("int", "flag")
    problems: list[_Problem] = []
    false = pd.Series(False, index=raw.index)
    exact_ok = false
    exact_ints: pd.Series | None = None
    finite_rule = f"'{name}' must be a finite number (leave the value empty for missing, never nan/inf)"
    range_rule = f"'{name}' must lie in [{bounds[0]}, {bounds[1]}] (the warehouse column's range)"
    precision_rule = (f"'{name}' must be representable as a float without changing it (at most 15 "
                      "significant digits, integers up to 2**53)")
    if pd.api.types.is_bool_dtype(raw.dtype):
        num = raw.astype("float64")
        nonfinite = out_of_range = lossy = false
        bad = false
    elif _is_text(raw):
        text = raw.astype("str").str.strip().where(~blank, "")
        num = pd.to_numeric(text.where(~blank), errors="coerce").astype("float64")
        words = ~blank & text.str.lower().isin(_NON_FINITE_WORDS)
        nonfinite = ~blank & (words | np.isinf(num.fillna(0.0)))
        bad = ~blank & num.isna() & ~words
        long_digits = ~blank & ~bad & ~nonfinite & (text.str.count(r"\d") > 15)
        lossy = out_of_range = false
        if integer:
            # Long integers are checked as Python ints: a float64 would round them first.
            exact = long_digits & text.str.fullmatch(_EXACT_INT.pattern)
            out_of_range = exact & text.where(exact, "0").map(lambda t: _out_of_range(t, *bounds))
            lossy = long_digits & ~exact & text.where(long_digits & ~exact, "0").map(_loses_precision)
            num_ok = ~bad & ~nonfinite & ~exact & ~lossy & num.notna()
            out_of_range = out_of_range | (num_ok & ((num < bounds[0]) | (num > bounds[1])))
            exact_ok = exact & ~out_of_range
            if exact_ok.any():
                exact_ints = text.where(exact_ok, "0").map(lambda t: int(t.split(".", 1)[0]))
        else:
            lossy = long_digits & text.where(long_digits, "0").map(_loses_precision)
    elif pd.api.types.is_integer_dtype(raw.dtype) or pd.api.types.is_float_dtype(raw.dtype):
        values = raw
        num = values.astype("float64")
        nonfinite = values.notna() & np.isinf(num.fillna(0.0)) if pd.api.types.is_float_dtype(raw.dtype) \
            else false
        bad = false
        lossy = false
        out_of_range = false
        if pd.api.types.is_integer_dtype(raw.dtype):
            big = values.notna() & ((values.astype("object") > _EXACT_FLOAT_INT)
                                    | (values.astype("object") < -_EXACT_FLOAT_INT))
            if integer:
                obj = values.astype("object")
                out_of_range = values.notna() & ((obj < bounds[0]) | (obj > bounds[1]))
            else:
                lossy = big.astype(bool)
        elif integer:
            out_of_range = ~nonfinite & num.notna() & ((num < bounds[0]) | (num > bounds[1]))
    else:
        num = pd.Series(np.nan, index=raw.index, dtype="float64")
        problems.append(_Problem(f"parse_{spec.kind}",
                                 f"values in '{name}' must parse as {word}; the column is stored as "
                                 f"{raw.dtype}", ~blank))
        return num, problems
    if integer:
        integral = np.isfinite(num.fillna(0.0)) & (num.fillna(0.0) == np.floor(num.fillna(0.0)))
        bad = bad | (~blank & ~nonfinite & num.notna() & ~integral)
    problems += [
        _Problem(f"parse_{spec.kind}", f"values in '{name}' must parse as {word}", bad),
        _Problem("finite_number", finite_rule, nonfinite),
        _Problem("integer_range", range_rule, out_of_range & ~bad & ~nonfinite),
        _Problem("float_precision", precision_rule, lossy & ~bad & ~nonfinite),
    ]
    failed = bad | nonfinite | out_of_range | lossy
    num = num.where(~failed)
    if integer:
        if exact_ints is not None and not (exact_ok & failed).any():
            # Integers too long for a float keep their exact value.
            ints = num.astype("object").where(~exact_ok, exact_ints)
            if ints.notna().all():
                return ints.astype("int64"), problems
        if num.notna().all():
            return num.astype("int64"), problems
        # Blanks stay NaN in a float column: GX 1.x mis-evaluates value sets on nullable Int64.
    return num, problems


def _coerce(raw: pd.Series, spec: ColumnSpec, table: str = "", *,
            check: bool = True) -> tuple[pd.Series, list[_Problem]]:
    """Return the typed column and the problems of its values (masks over the rows).

    ``check=False`` types values the gate has already accepted and skips the text hygiene rules.
    """
    if isinstance(raw.dtype, pd.CategoricalDtype):
        raw = raw.astype("object")
    if spec.kind in ("id", "str"):
        raw = _exact_integer_text(raw)
    blank = _blank(raw)
    if spec.kind in ("id", "str"):
        if not _is_text(raw):
            example = raw[raw.notna()].iloc[0] if raw.notna().any() else None
            text = (f"'{spec.name}' must be stored as text, not {raw.dtype} (e.g. {example!r}): ids and "
                    "codes are exact strings, and a number would drop leading zeros or read 100000 as "
                    "'100000.0'; write the column as a string")
            return raw.astype("str"), [_Problem("type_string", text, raw.notna())]
        if not check:
            return raw.where(~blank, "" if spec.empty_ok else None).astype("str"), []
        non_text = _non_text(raw)
        problems = []
        if non_text.any():
            problems.append(_Problem("type_string", f"'{spec.name}' must hold text only (found values of "
                                     "another type)", non_text))
        out = raw.where(~blank, "" if spec.empty_ok else None)
        return out.astype("str"), problems + _text_problems(table, spec, raw.where(~non_text))
    if spec.kind in ("timestamp", "date"):
        return _coerce_time(raw, spec, blank)
    return _coerce_number(raw, spec, blank, INTEGER_RANGES.get((table, spec.name), _INT64))


def _samples(raw: pd.DataFrame, mask: pd.Series, line_offset: int | LineMap | None,
             column: str) -> list[dict]:
    samples = []
    for i in list(raw.index[mask.to_numpy(dtype=bool)][:MAX_SAMPLE_ROWS]):
        row: dict = {"_row": int(i)}
        if line_offset is not None:
            row["_line"] = int(i) + line_offset
        # Text stays exactly as the file has it; numpy scalars become plain values.
        row[column] = _shown(raw.at[i, column])
        row.update({c: _shown(raw.at[i, c]) for c in raw.columns if c != column})
        samples.append(row)
    return samples


def _shown(value: object) -> object:
    return value if isinstance(value, str) else plain_value(value)


def _problem_failure(table: str, raw: pd.DataFrame, column: str, problem: _Problem,
                     line_offset: int | LineMap | None) -> Failure | None:
    n = int(problem.mask.sum())
    if not n:
        return None
    samples = _samples(raw, problem.mask, line_offset, column)
    where = ", ".join(
        (f"line {s['_line']}" if "_line" in s else f"row {s['_row']}") + f" = {s[column]!r}" for s in samples
    )
    return without_personal_data(Failure(problem.rule, column, f"{problem.text}; bad: {where}", n, samples),
                                 table)


@dataclass
class RawTable:
    """A raw file read into a typed frame.

    Attributes:
        frame: Declared columns typed (see :func:`read_table`), extra columns as read.
        line_offset: File line of data row 0 (2 for CSV), a :class:`LineMap` when quoted fields
            span lines, or ``None`` for Parquet; ``position + line_offset`` is a row's line.
        warnings: Findings that do not block (several UTC offsets in one column).
    """

    frame: pd.DataFrame
    line_offset: int | LineMap | None
    warnings: list[Failure] = field(default_factory=list)


def coerce_frame(
    path: Path,
    schema: TableSchema,
    raw: pd.DataFrame,
    line_offset: int | LineMap | None,
    *,
    check: bool = True,
) -> tuple[pd.DataFrame, list[Failure]]:
    """Type the declared columns of a raw frame; refuse values that break a hygiene rule.

    Sample rows are named by ``raw``'s index (a chunk of a large file keeps its file positions).

    ``check=False`` only types a frame the gate has already accepted (a streamed file read again
    to load it): the text hygiene rules are skipped.

    Returns:
        The typed frame (a fresh RangeIndex) and the non-blocking findings.

    Raises:
        DataContractError: Some value does not parse or breaks a rule of the module docstring.
    """
    out = {}
    failures: list[Failure] = []
    warnings: list[Failure] = []
    for spec in schema.columns:
        if spec.optional and spec.name not in raw.columns:
            # An export made before the column existed: every value is empty ("no product").
            out[spec.name] = pd.Series("", index=raw.index, dtype="object")
            continue
        typed, problems = _coerce(raw[spec.name], spec, schema.name, check=check)
        out[spec.name] = typed
        for problem in problems:
            found = _problem_failure(schema.name, raw, spec.name, problem, line_offset)
            if found is not None:
                (warnings if problem.warning else failures).append(found)
    declared = set(schema.column_names)
    for col in raw.columns if check else ():
        if col not in declared and _is_text(raw[col]):
            present = raw[col].notna()
            nul = present & raw[col].where(present, "").astype("str").str.contains("\x00", regex=False)
            found = _problem_failure(schema.name, raw, col, _Problem(
                "no_nul_bytes", f"'{col}' must not contain NUL bytes (\\x00)", nul), line_offset)
            if found is not None:
                failures.append(found)
    if failures:
        raise _fail(path, failures, f"{len(failures)} problem(s) with the values of declared columns")
    frame = pd.DataFrame(out, index=raw.index)
    # Unexpected extra columns travel along untouched; the gate reports them (warning or error).
    for col in raw.columns:
        if col not in out:
            frame[col] = raw[col]
    return frame.reset_index(drop=True), warnings


def read_file_bytes(path: Path) -> tuple[str, bytes | None]:
    """Return a supported file's format and, for CSV, its (decompressed) bytes.

    Args:
        path: A ``.csv``, ``.csv.gz`` or ``.parquet`` file (any letter case), not a symbolic link.

    Returns:
        ``(format, data)``: ``data`` is ``None`` for Parquet (read by pyarrow from the path).

    Raises:
        FileNotFoundError: The file does not exist.
        DataContractError: Unsupported suffix, a symbolic link, an empty file or broken gzip.
    """
    path = Path(path)
    fmt = file_format(path)
    if fmt is None:
        raise _fail(path, [Failure("file_type", None, f"file name {path.name!r} does not end with one of "
                                   f"{SUPPORTED_SUFFIXES}", 1)], "unsupported file type")
    if path.is_symlink():
        raise _fail(path, [Failure("no_symlinks", None, f"{path.name} is a symbolic link (to "
                                   f"{os.readlink(path)}); give the real file (links are not followed)",
                                   1)], "symbolic link refused")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise _fail(path, [Failure("not_empty", None, "file is empty (0 bytes); expected a header row", 0)],
                    "file is empty (0 bytes)")
    if fmt == "parquet":
        return fmt, None
    data = path.read_bytes()
    return fmt, _gunzip(path, data) if fmt == "csv.gz" else data


def read_raw_table(path: Path, table: str, *, strict: bool = False, allow_empty: bool = False) -> RawTable:
    """Read one raw file into a typed frame, with the line of each row and non-blocking findings.

    Args:
        path: A ``.csv`` (UTF-8, header row), ``.csv.gz`` or ``.parquet`` file.
        table: Raw table name, a key of :data:`RAW_SCHEMAS`.
        strict: Raise on columns the contract does not declare.
        allow_empty: Accept a file with a header but no rows.

    Returns:
        The frame, its line offset (or map) and the warnings.

    Raises:
        DataContractError: See :func:`read_table`.
    """
    path = Path(path)
    if table not in RAW_SCHEMAS:
        raise ValueError(f"unknown raw table {table!r}; expected one of {sorted(RAW_SCHEMAS)}")
    schema = RAW_SCHEMAS[table]
    fmt, data = read_file_bytes(path)
    if fmt == "parquet":
        raw, line_offset = _read_parquet(path), None
    else:
        raw, line_offset = _read_csv(path, data)
    columns = [str(c) for c in raw.columns]
    raw.columns = columns
    check_columns(path, table, columns, len(raw), strict=strict, allow_empty=allow_empty)
    frame, warnings = coerce_frame(path, schema, raw, line_offset)
    return RawTable(frame, line_offset, warnings)


def check_columns(path: Path, table: str, columns: list[str], n_rows: int, *, strict: bool = False,
                  allow_empty: bool = False) -> None:
    """Refuse a file whose header does not match its table's contract, or that holds no rows.

    Raises:
        DataContractError: a required column is missing, a column appears twice, (strict) a column
            is not in the contract, or there are no data rows and ``allow_empty`` is false.
    """
    schema = RAW_SCHEMAS[table]
    failures = [
        Failure("required_column", c, f"required column '{c}' is missing (file has {columns})", 1)
        for c in schema.required_names if c not in columns
    ]
    if len(set(columns)) != len(columns):
        dup = sorted({c for c in columns if columns.count(c) > 1})
        failures += [Failure("unique_column_names", c, f"column '{c}' appears more than once", 1)
                     for c in dup]
    extra = [c for c in columns if c not in schema.column_names]
    if strict:
        failures += [
            Failure("unexpected_column", c, f"column '{c}' is not in the {table} contract (strict mode)", 1)
            for c in extra
        ]
    if failures:
        raise _fail(path, failures, f"columns do not match the {table} contract")
    if n_rows == 0 and not allow_empty:
        raise _fail(path, [Failure("not_empty", None, "file has a header but no data rows", 0)],
                    "header only, no data rows")


def read_table(path: Path, table: str, *, strict: bool = False, allow_empty: bool = False) -> pd.DataFrame:
    """Read one raw file into a frame with the contract's column types.

    Args:
        path: A ``.csv`` (UTF-8, header row), ``.csv.gz`` or ``.parquet`` file.
        table: Raw table name, a key of :data:`RAW_SCHEMAS`.
        strict: Raise on columns the contract does not declare (otherwise they are kept and the
            gate reports them as warnings).
        allow_empty: Accept a file with a header but no rows.

    Returns:
        The frame: ids and strings as ``str`` (exactly as written), numbers as float64/int64
        (float64 when an integer column has blanks, which the not-null rule then reports),
        timestamps and dates as UTC ``datetime64``; declared columns first, then any extra
        columns as raw strings.

    Raises:
        DataContractError: The file is empty, header-only, truncated, not UTF-8, a symbolic link,
            has a duplicated header, lacks a required column, holds a value that does not parse or
            breaks a hygiene rule of the module docstring, or (strict) has an extra column.
    """
    return read_raw_table(path, table, strict=strict, allow_empty=allow_empty).frame


def text_problems(df: pd.DataFrame, column: str, *, identifier: bool = True, max_length: int | None = None,
                  line_offset: int | LineMap | None = None) -> list[Failure]:
    """Return the hygiene failures of one text column of any frame (e.g. an imported log's id column).

    Args:
        df: The frame.
        column: Column to check.
        identifier: Apply the identifier rules (stored as text, no surrounding whitespace, no
            control or invisible characters), not only the NUL rule.
        max_length: Longest value allowed (the warehouse column's length), or no limit.
        line_offset: File line of data row 0 (or a line map), for messages.

    Returns:
        One failure per broken rule, with up to five rows (``_row`` positions, ``_line`` with lines).
    """
    spec = ColumnSpec(column, "id" if identifier else "str")
    raw = df.reset_index(drop=True)
    series = raw[column]
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype("object")
    series = _exact_integer_text(series)
    if not _is_text(series):
        if not identifier:
            return []
        example = series[series.notna()].iloc[0] if series.notna().any() else None
        return [Failure("type_string", column,
                        f"'{column}' must be stored as text, not {series.dtype} (e.g. {example!r}): ids are "
                        "exact strings, and a number would drop leading zeros or read 100000 as '100000.0'",
                        int(series.notna().sum()), _samples(raw, series.notna(), line_offset, column))]
    non_text = _non_text(series)
    problems = [_Problem("type_string", f"'{column}' must hold text only", non_text)] if identifier else []
    problems += _text_problems("", spec, series.where(~non_text), max_length=max_length)
    out = [_problem_failure("", raw, column, p, line_offset) for p in problems]
    return [f for f in out if f is not None]

