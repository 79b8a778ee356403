"""Vocabulary of the data contract: the validation context, failures, reports and the error.

This module imports neither Great Expectations nor pandas so that readers, the CLI and the
DAG wiring can name these types cheaply.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pandas as pd

#: Channels the shop can send through (contract: email, sms, push).
DEFAULT_CHANNELS: frozenset[str] = frozenset({"email", "sms", "push"})
#: Largest plausible single revenue value; a 1e12 order is a unit or parsing bug, not a sale.
DEFAULT_REVENUE_CAP = 1e6
#: Contact formats of ``contacts.csv`` (an empty value means "no contact on that channel"):
#: an address ``local@domain.tld`` of at most 320 characters without spaces,
EMAIL_PATTERN = r"^(?=.{3,320}$)[^@\s]+@[^@\s]+\.[^@\s.]+$"
#: a phone number in E.164 form (``+`` then 7 to 15 digits, the first not 0),
PHONE_PATTERN = r"^\+[1-9][0-9]{6,14}$"
#: and a push token of 8 to 512 visible characters.
PUSH_TOKEN_PATTERN = r"^[\x21-\x7e]{8,512}$"
#: Columns holding personal data, per table: a failure's example rows show them only when the
#: failure is about that column, so an error message never spreads a customer's other contacts.
PERSONAL_COLUMNS: dict[str, frozenset[str]] = {"contacts": frozenset({"email", "phone", "push_token"})}
#: How many failing rows a failure keeps and a message shows.
MAX_SAMPLE_ROWS = 5
# Sources with these endings are files (named by file name in messages); others are stage outputs.
_FILE_SUFFIXES = frozenset({".csv", ".parquet", ".json", ".jsonl", ".tsv", ".txt", ".gz", ".yaml", ".yml"})


def _utc(value: Any) -> dt.datetime:
    """Return ``value`` (datetime, pandas Timestamp or ISO string) as an aware UTC datetime."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if hasattr(value, "to_pydatetime"):
        value = value.to_pydatetime()
    if not isinstance(value, dt.datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__}: {value!r}")
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


class WarehouseView(Protocol):
    """What the cross-batch rules may ask about the warehouse (implemented by the ingest stage).

    Validation stays pure of the database: the ingest stage hands in an object with these methods,
    each answering from the warehouse as it is before the batch loads.
    """

    def stored_rows(self, table: str, keys: Sequence[Any]) -> pd.DataFrame:
        """Return the stored rows of a raw table whose natural key is in ``keys`` (raw column names)."""

    def campaigns(self) -> dict[str, dt.datetime]:
        """Return every known campaign id and its send time (``as_of``)."""

    def campaign_ledger(self, campaign_ids: Sequence[str]) -> pd.DataFrame:
        """Return ``campaign_id, customer_id, coupon_id, delivered`` of the campaigns' allocations."""

    def order_facts(self, order_ids: Sequence[str]) -> pd.DataFrame:
        """Return ``order_id, customer_id, revenue, stored_in`` of orders already stored under these ids."""

    def log_owners(self) -> dict[str, str]:
        """Return each stored campaign log's name and owning source kind."""


@dataclass
class ValidationContext:
    """Parameters the data contract needs beyond the frame itself.

    Attributes:
        now: Latest plausible timestamp (the logical date of the run, UTC). Rows stamped after
            it fail the timestamp-sanity rule.
        shop_opened: Earliest plausible timestamp; rows before it fail.
        known_customers: Customer ids that exist (for referential integrity); ``None`` skips the
            check unless the batch itself carries ``customers``.
        known_coupons: Coupon ids that exist; ``None`` skips the check unless the batch carries
            ``coupons``.
        known_products: Product ids of the catalogue; ``None`` skips the check unless the batch
            carries ``products``. A ``product_id`` left empty (or a file without the column) means
            "no product" and always passes.
        channels: Channels messages may use.
        previous_row_counts: Row count of each table in the previous batch, for the volume rule.
        volume_min_ratio: A batch with fewer than this share of the previous rows fails.
        volume_max_ratio: A batch with more than this multiple of the previous rows fails.
        reference: Reference sample per table for the drift rule (PSI).
        drift_columns: Columns compared per table; defaults to each table's key columns.
        psi_threshold: PSI above which a column's drift is reported (as a warning).
        revenue_cap: Upper bound for any revenue value.
        strict: Unexpected extra columns fail instead of warning.
        max_sample_rows: Failing rows kept per failure.
        warehouse: The warehouse as it is before the batch loads, for the rules across batches
            (contradictions with stored rows, known campaigns, their ledgers and send times);
            ``None`` checks a batch on its own.
        chunk_rows: A large Parquet file of a streamed table (see
            :mod:`mlpkg.validation.streaming`) with more rows than this is read and checked in
            chunks of this many rows.
        pseudonymise: ``pseudonymise(table, typed_frame)`` returns the frame as the rules and the
            load see it (the warehouse's pseudonyms instead of the shop's customer ids, see
            :class:`mlpkg.privacy.Pseudonymiser`); ``None`` keeps the file's values.
    """

    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    shop_opened: dt.datetime = field(default_factory=lambda: dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    known_customers: frozenset[str] | None = None
    known_coupons: frozenset[str] | None = None
    known_products: frozenset[str] | None = None
    channels: frozenset[str] = DEFAULT_CHANNELS
    previous_row_counts: Mapping[str, int] | None = None
    volume_min_ratio: float = 0.2
    volume_max_ratio: float = 5.0
    reference: Mapping[str, pd.DataFrame] | None = None
    drift_columns: Mapping[str, list[str]] | None = None
    psi_threshold: float = 0.25
    revenue_cap: float = DEFAULT_REVENUE_CAP
    strict: bool = False
    max_sample_rows: int = MAX_SAMPLE_ROWS
    warehouse: WarehouseView | None = None
    chunk_rows: int = 500_000
    pseudonymise: Callable[[str, pd.DataFrame], pd.DataFrame] | None = None
    # One Great Expectations context per ValidationContext, created on first use.
    _runner: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Normalise timestamps to UTC and id collections to frozensets."""
        self.now = _utc(self.now)
        self.shop_opened = _utc(self.shop_opened)
        if self.shop_opened >= self.now:
            raise ValueError(f"shop_opened ({self.shop_opened}) must be before now ({self.now})")
        if self.known_customers is not None:
            self.known_customers = frozenset(str(x) for x in self.known_customers)
        if self.known_coupons is not None:
            self.known_coupons = frozenset(str(x) for x in self.known_coupons)
        if self.known_products is not None:
            self.known_products = frozenset(str(x) for x in self.known_products)
        self.channels = frozenset(self.channels)
        if not 0 < self.volume_min_ratio < 1 < self.volume_max_ratio:
            raise ValueError("volume ratios must satisfy 0 < volume_min_ratio < 1 < volume_max_ratio")


def plain_value(value: Any) -> Any:
    """Return a numpy/pandas scalar as a plain JSON value (NaN/NaT/NA become None, times ISO text)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if type(value).__name__ in ("NaTType", "NAType"):
        return None
    if isinstance(value, float):  # includes np.float64, which would print as np.float64(...)
        value = float(value)
        return value if math.isfinite(value) else (None if math.isnan(value) else str(value))
    if hasattr(value, "isoformat"):
        try:
            return value.isoformat()
        except ValueError:
            # NaT has isoformat but raises/returns "NaT".
            return None
    if hasattr(value, "item"):
        return plain_value(value.item())
    try:
        if value != value:  # pandas NA/NaT compare unequal to themselves
            return None
    except TypeError:
        return str(value)
    return str(value)


def _gx_json(result: Any) -> dict[str, Any] | None:
    """Return a GX validation result as plain JSON data (``None`` if absent or unserialisable)."""
    if result is None:
        return None
    try:
        return json.loads(json.dumps(result.to_json_dict(), default=str))
    except (TypeError, ValueError, AttributeError) as err:
        # A result GX cannot serialise must not hide the report itself.
        return {"error": f"GX result not serialisable: {err}"}


class LineMap:
    """The file line of each data row of a CSV whose quoted fields span several lines.

    It stands where a constant line offset (2 for a CSV with a header) stands elsewhere:
    ``position + line_map`` is the line on which data row ``position`` starts, so every rule that
    writes ``pos + line_offset`` names the right line also after embedded newlines.

    Args:
        lines: First line of each data row, in row order.
    """

    __slots__ = ("lines",)

    def __init__(self, lines: Sequence[int]) -> None:
        """Keep the first line of every data row."""
        self.lines = tuple(int(n) for n in lines)

    def __radd__(self, position: int) -> int:
        """Return the line of data row ``position``."""
        return self.lines[int(position)]

    __add__ = __radd__

    def __repr__(self) -> str:
        """Return a short description (the map can hold millions of lines)."""
        return f"LineMap({len(self.lines)} rows)"


@dataclass(frozen=True)
class Failure:
    """One broken rule: which expectation, on which column, how many rows, and examples.

    Attributes:
        expectation: Expectation type (GX snake-case name) or explicit-check name.
        column: Column the rule is about (``None`` for table-level rules; several columns are
            joined with ``+``).
        rule_text: The rule in words, e.g. ``revenue must be between 0 and 1000000``.
        failing_count: Number of rows (or items) that break the rule.
        sample_rows: Up to ``max_sample_rows`` failing rows as dicts; ``_row`` is the 0-based
            data row and, for CSV input, ``_line`` the 1-based line in the file.
    """

    expectation: str
    column: str | None
    rule_text: str
    failing_count: int
    sample_rows: list[dict[str, Any]] = field(default_factory=list)

    def describe(self, max_rows: int = MAX_SAMPLE_ROWS) -> str:
        """Return a one-paragraph description naming expectation, column, rule and rows."""
        where = f" on column '{self.column}'" if self.column else ""
        text = f"{self.expectation}{where}: {self.rule_text} ({self.failing_count} failing)"
        rows = self.sample_rows[:max_rows]
        if rows:
            lines = []
            for row in rows:
                pos = []
                if "_row" in row:
                    pos.append(f"row {row['_row']}")
                if "_line" in row:
                    pos.append(f"line {row['_line']}")
                values = {k: v for k, v in row.items() if k not in {"_row", "_line"}}
                lines.append(f"      {', '.join(pos) or 'item'}: {values}")
            text += "\n" + "\n".join(lines)
        return text

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "expectation": self.expectation,
            "column": self.column,
            "rule_text": self.rule_text,
            "failing_count": int(self.failing_count),
            "sample_rows": [{k: plain_value(v) for k, v in row.items()} for row in self.sample_rows],
        }


def without_personal_data(failure: Failure, table: str) -> Failure:
    """Return ``failure`` with the table's personal columns dropped from its example rows.

    The column the failure is about stays (the message must show the bad value); the others go.
    """
    personal = PERSONAL_COLUMNS.get(table)
    if not personal or not failure.sample_rows:
        return failure
    named = set((failure.column or "").split("+"))
    rows = [{k: v for k, v in row.items() if k not in personal or k in named} for row in failure.sample_rows]
    return replace(failure, sample_rows=rows)


@dataclass
class ValidationReport:
    """Outcome of validating one table (one file of a batch, or one product frame).

    Attributes:
        table: Contract table name (``orders``, ``model_scores``, ...).
        source: Where the rows came from: a file path or a table name.
        row_count: Rows validated (0 when the file could not be read).
        failures: Broken rules; any failure makes the report unsuccessful.
        warnings: Rules reported but not blocking (extra columns, drift).
        gx_result: The Great Expectations suite validation result (``None`` when GX did not run,
            e.g. the file was unreadable); serialised only by :meth:`to_dict`, which is slow.
    """

    table: str
    source: str
    row_count: int = 0
    failures: list[Failure] = field(default_factory=list)
    warnings: list[Failure] = field(default_factory=list)
    gx_result: Any = field(default=None, repr=False, compare=False)

    @property
    def success(self) -> bool:
        """Return whether no rule failed (warnings do not count)."""
        return not self.failures

    def message(self, max_rows: int = MAX_SAMPLE_ROWS) -> str:
        """Return a readable summary naming the source, each expectation, column and failing rows."""
        # A file is named by its file name; a stage output ("model scores of models:/m/3") as is.
        is_file = bool(self.source) and Path(self.source).suffix.lower() in _FILE_SUFFIXES
        name = Path(self.source).name if is_file else (self.source or self.table)
        where = f"{name} (table {self.table}, {self.source})" if is_file else f"{name} (table {self.table})"
        if self.success:
            head = f"{where}: passed ({self.row_count} rows checked)"
        elif self.gx_result is None and self.row_count == 0:
            head = f"{where}: could not be read, {len(self.failures)} problem(s)"
        else:
            head = f"{where}: {len(self.failures)} rule(s) failed ({self.row_count} rows checked)"
        parts = [head]
        parts += [f"  - FAIL {f.describe(max_rows)}" for f in self.failures]
        parts += [f"  - WARN {w.describe(max_rows)}" for w in self.warnings]
        return "\n".join(parts)

    def to_dict(self, include_gx: bool = True) -> dict[str, Any]:
        """Return a JSON-serialisable dict (optionally with the raw GX result)."""
        out: dict[str, Any] = {
            "table": self.table,
            "source": self.source,
            "success": self.success,
            "row_count": self.row_count,
            "failures": [f.to_dict() for f in self.failures],
            "warnings": [w.to_dict() for w in self.warnings],
        }
        if include_gx:
            out["gx_result"] = _gx_json(self.gx_result)
        return out


class DataContractError(ValueError):
    """Raised when data breaks the contract; ``str(err)`` names file, column, rule and rows.

    Attributes:
        failures: The broken rules (for errors raised while reading a single file).
        reports: Reports of every table checked (for batch errors).
        quarantine_path: Where the rejected batch was moved, if it was.
    """

    def __init__(
        self,
        message: str,
        *,
        failures: list[Failure] | None = None,
        reports: list[ValidationReport] | None = None,
        quarantine_path: Path | None = None,
    ) -> None:
        """Create the error with its message and structured details."""
        super().__init__(message)
        self.failures = failures or []
        self.reports = reports or []
        self.quarantine_path = quarantine_path
