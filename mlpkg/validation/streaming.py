"""Large raw files in bounded chunks: the same contract as a whole file, with bounded memory.

A behaviour-event export can hold tens of millions of rows. Reading it into one frame would cost
about 1 KB of memory per row, so a Parquet file of a table in :data:`STREAMED_TABLES` with more
rows than the chunk size is read with ``pyarrow.parquet.ParquetFile.iter_batches`` instead:

* every chunk is typed and checked by the same reader rules (:func:`readers.coerce_frame`) and
  the same expectation suite as a whole file, and a failure names the row of the *file*, not
  of the chunk;
* rules that span the file (a key that appears twice, in any two chunks) are checked on a
  64-bit hash of each key, 8 bytes per row, and confirmed on the exact values before they are
  reported;
* findings of the same rule in several chunks are merged into one failure with the total count
  and the first example rows, so the message reads as if the file had been checked at once.

Rules against stored rows (a later event that contradicts a stored one) need the warehouse and
run where the chunks are loaded (:mod:`mlpkg.db.bulk`), inside the batch's transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from mlpkg.validation.contract import MAX_SAMPLE_ROWS, Failure, plain_value
from mlpkg.validation.readers import (
    RAW_SCHEMAS,
    check_columns,
    coerce_frame,
    file_format,
    file_refusal,
    read_file_bytes,
)

#: Raw tables whose large Parquet files are streamed (facts with no rule across tables that needs
#: the whole file in memory).
STREAMED_TABLES: tuple[str, ...] = ("events",)


@dataclass(frozen=True)
class StreamedFile:
    """A large raw file the gate validated chunk by chunk; the loader reads it again the same way."""

    path: Path
    table: str
    rows: int
    chunk_rows: int
    #: The gate's ``pseudonymise(table, frame)`` (see ``ValidationContext.pseudonymise``), or None.
    pseudonymise: Callable[[str, pd.DataFrame], pd.DataFrame] | None = None

    def chunks(self) -> Iterator[tuple[int, pd.DataFrame]]:
        """Yield ``(first row, typed frame)`` per chunk (the gate has already accepted every value)."""
        for start, raw in iter_raw_chunks(self.path, self.table, chunk_rows=self.chunk_rows):
            frame = coerce_frame(self.path, RAW_SCHEMAS[self.table], raw, None, check=False)[0]
            yield start, (self.pseudonymise(self.table, frame) if self.pseudonymise is not None else frame)


def parquet_rows(path: Path) -> int | None:
    """Return a Parquet file's row count from its footer, or ``None`` when it cannot be read."""
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception:  # noqa: BLE001 - pyarrow raises several types; the reader names the problem
        return None


def streams(path: Path, table: str, chunk_rows: int) -> bool:
    """Tell whether ``path`` is read in chunks: a streamed table's Parquet file of more than one chunk."""
    if table not in STREAMED_TABLES or file_format(path) != "parquet" or Path(path).is_symlink():
        return False
    rows = parquet_rows(path)
    return rows is not None and rows > chunk_rows


def iter_raw_chunks(
    path: Path, table: str, *, chunk_rows: int, strict: bool = False
) -> Iterator[tuple[int, pd.DataFrame]]:
    """Read a Parquet file ``chunk_rows`` rows at a time, untyped (values as the file has them).

    Yields:
        ``(first row, raw frame)``: the frame's index is the rows' positions in the file, so
        :func:`~mlpkg.validation.readers.coerce_frame` names file rows.

    Raises:
        DataContractError: The file is unreadable or its columns break the contract (before any
            chunk is read).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    read_file_bytes(path)  # refuses a link, an empty file or a wrong suffix before opening it
    try:
        parquet = pq.ParquetFile(path)
        columns = [str(c) for c in parquet.schema_arrow.names]
        n_rows = int(parquet.metadata.num_rows)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several unrelated types
        failure = Failure("parquet_readable", None, f"file is not readable Parquet: {err}", 1)
        raise file_refusal(path, [failure], "unreadable Parquet file") from None
    check_columns(path, table, columns, n_rows, strict=strict)
    start = 0
    for batch in parquet.iter_batches(batch_size=chunk_rows):
        raw = batch.to_pandas()
        raw.columns = columns
        raw.index = pd.RangeIndex(start, start + len(raw))
        yield start, raw
        start += len(raw)


def coerce_chunk(path: Path, table: str, raw: pd.DataFrame) -> tuple[pd.DataFrame, list[Failure]]:
    """Type one raw chunk (see :func:`~mlpkg.validation.readers.coerce_frame`)."""
    return coerce_frame(Path(path), RAW_SCHEMAS[table], raw, None)


def shift_rows(failure: Failure, offset: int) -> Failure:
    """Return ``failure`` with its example rows moved from chunk positions to file positions."""
    if not offset or not failure.sample_rows:
        return failure
    rows = [{**r, "_row": int(r["_row"]) + offset} if "_row" in r else r for r in failure.sample_rows]
    return replace(failure, sample_rows=rows)


class FailureMerger:
    """Collects the failures of many chunks; one failure per rule and column, counts summed."""

    def __init__(self, max_rows: int = MAX_SAMPLE_ROWS) -> None:
        """Start empty; keep up to ``max_rows`` example rows per failure."""
        self.max_rows = max_rows
        self._merged: dict[tuple[str, str | None], Failure] = {}

    def add(self, failures: list[Failure]) -> None:
        """Merge one chunk's failures (already in file positions)."""
        for f in failures:
            key = (f.expectation, f.column)
            seen = self._merged.get(key)
            if seen is None:
                self._merged[key] = replace(f, sample_rows=list(f.sample_rows[: self.max_rows]))
                continue
            rows = (seen.sample_rows + list(f.sample_rows))[: self.max_rows]
            self._merged[key] = replace(seen, failing_count=seen.failing_count + f.failing_count,
                                        sample_rows=rows)

    @property
    def failures(self) -> list[Failure]:
        """The merged failures, in the order their rule first failed."""
        return list(self._merged.values())


class KeyTracker:
    """Finds keys that appear more than once across the chunks of a file, in 8 bytes per row."""

    def __init__(self, key: tuple[str, ...]) -> None:
        """Track the key columns ``key``."""
        self.key = key
        self._hashes: list[np.ndarray] = []

    def add(self, frame: pd.DataFrame) -> None:
        """Remember the hashes of one chunk's keys (chunks must be added in file order)."""
        self._hashes.append(pd.util.hash_pandas_object(frame[list(self.key)], index=False).to_numpy())

    def duplicates(self, exact: Callable[[np.ndarray], pd.DataFrame], *, max_rows: int = MAX_SAMPLE_ROWS,
                   what: str = "the file") -> Failure | None:
        """Return the failure for keys that repeat, confirmed on their exact values, or ``None``.

        Args:
            exact: Returns the key columns of the rows at some file positions (read again).
            max_rows: Example rows to keep.
            what: The file, for the message.
        """
        if not self._hashes:
            return None
        hashes = np.concatenate(self._hashes)
        order = np.argsort(hashes, kind="stable")
        ranked = hashes[order]
        same = ranked[1:] == ranked[:-1]
        if not same.any():
            return None
        candidates = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
        keys = exact(candidates).reset_index(drop=True)
        keys.insert(0, "_row", candidates)
        repeated = keys[keys.duplicated(list(self.key), keep=False)]
        if repeated.empty:
            return None  # a hash collision, not a repeated key
        later = repeated[repeated.duplicated(list(self.key), keep="first")]
        column = "+".join(self.key)
        first = later.iloc[0]
        ident = ", ".join(f"{k} {first[k]!r}" for k in self.key)
        rows = [{"_row": int(r["_row"]), **{k: plain_value(r[k]) for k in self.key}}
                for _, r in later.head(max_rows).iterrows()]
        return Failure("unique_key", column, f"{column} must be unique in {what}; {ident} appears more "
                       "than once", len(later), rows)
