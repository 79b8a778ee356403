"""Bulk writes of large fact chunks (behaviour events) inside the caller's transaction.

One statement per row through the ORM costs more than the database's own work, so a chunk goes
to the database the way each engine loads data fastest, on the session's own connection (so it
commits or rolls back with the rest of the batch):

* **PostgreSQL**: ``COPY ... FROM STDIN`` (CSV written by Arrow) straight into the table in a
  savepoint; when a key is stored already, into a temporary staging table instead, then
  ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``;
* **SQLite**: the driver's ``executemany`` of one prepared ``INSERT ... ON CONFLICT DO NOTHING``
  with plain tuples (low-cardinality text shares one Python object per distinct value);
* any other engine: SQLAlchemy's batched executemany.

:func:`insert_missing` inserts the rows whose key is new and says how many it inserted: when some
key was stored already the caller compares the chunk with the stored rows (replays are skipped;
a contradiction refuses the batch, and the batch's transaction rolls back every chunk).

:class:`ChunkLoader` does the same for a stream of chunks. On PostgreSQL it overlaps the
client's work with the server's: one worker thread encodes a chunk and ships it with ``COPY``
(the server parses and indexes it; the client only waits, without the GIL) while the caller
reads and checks the next chunk. On SQLite the writer needs the GIL itself, so chunks are
written in the caller's thread (overlapping them measured slower).
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd
from sqlalchemy import Table, insert
from sqlalchemy.orm import Session


def _sqlite_timestamps(values: pd.Series) -> list:
    """Return UTC timestamps as SQLAlchemy's SQLite DateTime text (``YYYY-MM-DD HH:MM:SS.ffffff``).

    Arrow's cast of a microsecond timestamp to text writes exactly that format, in C (about ten
    times faster than NumPy's ``datetime_as_string``; Python ``datetime`` objects cost more still).
    """
    import pyarrow as pa

    utc = values.dt.tz_convert("UTC").dt.tz_localize(None) if values.dt.tz is not None else values
    micros = utc.to_numpy(dtype="datetime64[us]")
    return pa.array(micros, mask=np.isnat(micros)).cast(pa.string()).to_pylist()


def _object_column(values: pd.Series, dialect: str) -> list:
    """Return a column as Python objects; repeated text shares one object per distinct value."""
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        if dialect == "sqlite":
            return _sqlite_timestamps(values)
        return values.astype(object).where(values.notna(), None).tolist()
    if pd.api.types.is_string_dtype(values.dtype) or values.dtype == object:
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        if len(uniques) * 4 < len(values):
            table = np.append(np.asarray(uniques, dtype=object), None)
            return table[np.where(codes >= 0, codes, len(uniques))].tolist()
    return values.astype(object).where(values.notna(), None).tolist()


def _sqlite_insert(session: Session, table: Table, frame: pd.DataFrame, columns: Sequence[str]) -> int:
    raw = session.connection().connection.driver_connection
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" for _ in columns)
    sql = f'INSERT INTO "{table.name}" ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING'
    cursor = raw.cursor()
    try:
        cursor.executemany(sql, zip(*(_object_column(frame[c], "sqlite") for c in columns), strict=True))
        return int(cursor.rowcount)
    finally:
        cursor.close()


def _csv_bytes(frame: pd.DataFrame, columns: Sequence[str]) -> bytes:
    """Return ``frame[columns]`` as CSV without a header (Arrow's writer: quoted text, ISO times)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    buffer = io.BytesIO()
    options = pacsv.WriteOptions(include_header=False, quoting_style="all_valid")
    pacsv.write_csv(pa.Table.from_pandas(frame[list(columns)], preserve_index=False), buffer, options)
    return buffer.getvalue()


def _postgres_insert(session: Session, table: Table, frame: pd.DataFrame, columns: Sequence[str]) -> int:
    import psycopg

    names = ", ".join(f'"{c}"' for c in columns)
    data = _csv_bytes(frame, columns)
    raw = session.connection().connection.driver_connection
    with raw.cursor() as cursor:
        # The usual case, every key new: one COPY straight into the table. A stored key makes
        # it fail as a whole; the savepoint undoes it and the staging path below skips the key.
        cursor.execute("SAVEPOINT couponops_copy")
        try:
            with cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN (FORMAT csv)') as copy:
                copy.write(data)
        except psycopg.errors.UniqueViolation:
            cursor.execute("ROLLBACK TO SAVEPOINT couponops_copy")
        else:
            cursor.execute("RELEASE SAVEPOINT couponops_copy")
            return len(frame)
        stage = f"couponops_stage_{table.name}"
        like = f'(LIKE "{table.name}" INCLUDING DEFAULTS)'
        cursor.execute(f'CREATE TEMP TABLE IF NOT EXISTS "{stage}" {like} ON COMMIT DROP')
        cursor.execute(f'TRUNCATE "{stage}"')
        # Quoted empty text stays '' and an unquoted empty field is NULL (Arrow quotes all text).
        with cursor.copy(f'COPY "{stage}" ({names}) FROM STDIN (FORMAT csv)') as copy:
            copy.write(data)
        cursor.execute(
            f'INSERT INTO "{table.name}" ({names}) SELECT {names} FROM "{stage}" ON CONFLICT DO NOTHING'
        )
        return int(cursor.rowcount)


def _generic_insert(session: Session, table: Table, frame: pd.DataFrame, columns: Sequence[str]) -> int:
    values = [_object_column(frame[c], "other") for c in columns]
    rows = [dict(zip(columns, r, strict=True)) for r in zip(*values, strict=True)]
    stmt = insert(table)
    if hasattr(stmt, "on_conflict_do_nothing"):
        stmt = stmt.on_conflict_do_nothing()
    return int(session.connection().execute(stmt, rows).rowcount)


def insert_missing(session: Session, table: Table, frame: pd.DataFrame, columns: Sequence[str]) -> int:
    """Insert the rows of a chunk of facts whose key is not stored yet; skip the others.

    Args:
        session: The batch's session (its transaction holds the write).
        table: The target table (its primary key is the facts' natural key).
        frame: The chunk, values already validated (text as ``str``, times as UTC ``datetime64``).
        columns: The columns to write (``frame`` columns named as the table's).

    Returns:
        The number of rows inserted: fewer than the chunk's when some keys were stored already,
        which the caller then compares with the stored rows (a contradiction rolls back the batch).
    """
    if frame.empty:
        return 0
    frame = _prepared(table, frame)
    dialect = session.get_bind().dialect.name
    writer = {"sqlite": _sqlite_insert, "postgresql": _postgres_insert}.get(dialect, _generic_insert)
    return writer(session, table, frame, columns)


def _prepared(table: Table, frame: pd.DataFrame) -> pd.DataFrame:
    # In key order the primary-key index is written page by page instead of at random places.
    return frame.sort_values([c.name for c in table.primary_key.columns], kind="stable")


class ChunkLoader:
    """Insert a stream of chunks with :func:`insert_missing`'s rules, overlapping I/O on PostgreSQL.

    ``submit`` queues a chunk; ``done`` yields ``(tag, frame, inserted)`` in submission order as
    chunks finish. At most ``depth`` chunks are in flight, so memory stays bounded. Use it as a
    context manager: leaving waits for every chunk in flight (also after an error), so the
    session's connection is idle again before the caller commits or rolls back.

    Example:
        >>> with ChunkLoader(session, table, columns) as loader:  # doctest: +SKIP
        ...     for tag, chunk in chunks:
        ...         for tag_, frame, inserted in loader.submit(tag, chunk):
        ...             ...
        ...     for tag_, frame, inserted in loader.drain():
        ...         ...
    """

    def __init__(self, session: Session, table: Table, columns: Sequence[str], *, depth: int = 1) -> None:
        """Bind the loader to the batch's session and the target table."""
        self.session, self.table, self.columns = session, table, list(columns)
        self.depth = depth
        dialect = session.get_bind().dialect.name
        pooled = dialect == "postgresql"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="couponops-copy") if pooled else None
        self._pending: deque[tuple[object, pd.DataFrame, Future[int]]] = deque()

    def _write(self, frame: pd.DataFrame) -> int:
        return insert_missing(self.session, self.table, frame, self.columns)

    def submit(self, tag: object, frame: pd.DataFrame) -> Iterator[tuple[object, pd.DataFrame, int]]:
        """Queue ``frame`` (labelled ``tag``); yield the chunks that finished meanwhile, in order."""
        if self._pool is None:
            yield tag, frame, self._write(frame)
            return
        self._pending.append((tag, frame, self._pool.submit(self._write, frame)))
        while len(self._pending) > self.depth:
            yield self._finish()

    def drain(self) -> Iterator[tuple[object, pd.DataFrame, int]]:
        """Yield every chunk still in flight, in order, as it finishes."""
        while self._pending:
            yield self._finish()

    def _finish(self) -> tuple[object, pd.DataFrame, int]:
        tag, frame, future = self._pending.popleft()
        return tag, frame, future.result()

    def __enter__(self) -> ChunkLoader:
        """Return the loader."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Wait for every chunk in flight; raise their errors only when the block raised none."""
        self.close(raise_errors=exc[0] is None)

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for every chunk in flight and stop the worker (idempotent).

        Args:
            raise_errors: Raise a chunk's error; ``False`` when the caller already has one to raise.
        """
        pending, self._pending = self._pending, deque()
        try:
            for _tag, _frame, future in pending:
                if raise_errors:
                    future.result()
                else:
                    future.exception()  # wait only
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
