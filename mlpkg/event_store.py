"""The columnar event store: behaviour events as Parquet parts beside the SQL warehouse.

The warehouse's ``events`` table stays the system of record (keys, contradictions, exactly-once
loads). Features aggregate tens of millions of events per build, which a row store answers
slowly, so each loaded events file also writes its *new* events (replays of stored events
excluded) to one Parquet part, ``<event store>/<file sha256>.parquet``:

* the part is written to a temporary name and renamed into place *before* its load commits, and
  listed in ``event_parts`` *in* that transaction: a reader uses only listed parts, so a load
  killed half-way leaves at most an unlisted file, which the re-run overwrites;
* :func:`listed_parts` returns ``None`` when the parts do not cover the warehouse (a warehouse
  loaded before the store existed, or a listed part that is gone): readers then aggregate the
  ``events`` table itself, which is slower and still correct.

In production the event store folder must be shared by every worker, like the warehouse.
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import datetime
from pathlib import Path

import pandas as pd
from sqlalchemy.orm import Session

from mlpkg.db import queries as q

_log = logging.getLogger(__name__)

#: The columns of a part, in the warehouse's names.
COLUMNS: tuple[str, ...] = ("event_id", "customer_id", "ts", "event_type", "category")


def _schema():  # noqa: ANN202 - pyarrow.Schema (pyarrow is imported lazily)
    import pyarrow as pa

    return pa.schema([
        ("event_id", pa.string()),
        ("customer_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("event_type", pa.string()),
        ("category", pa.string()),
    ])


class PartWriter:
    """Writes one events file's new events to a part, chunk by chunk, and publishes it atomically."""

    def __init__(self, root: Path, sha256: str) -> None:
        """Prepare ``<root>/<sha256>.parquet`` (nothing is written until the first chunk)."""
        self.root = Path(root)
        self.path = self.root / f"{sha256}.parquet"
        self.sha256 = sha256
        self.rows = 0
        self._tmp = self.root / f".{sha256}.{uuid.uuid4().hex}.tmp"
        self._writer = None

    def write(self, frame: pd.DataFrame) -> None:
        """Append validated events (the warehouse's column names)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if frame.empty:
            return
        table = pa.Table.from_pandas(frame[list(COLUMNS)], schema=_schema(), preserve_index=False)
        if self._writer is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._tmp, _schema(), compression="zstd")
        self._writer.write_table(table)
        self.rows += len(frame)

    def publish(self) -> Path | None:
        """Close the part and rename it into place; return its path (``None``: no new events)."""
        if self._writer is None:
            return None
        self._writer.close()
        self._writer = None
        os.replace(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Drop an unpublished part (the load failed)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._tmp.unlink(missing_ok=True)


def record_part(session: Session, writer: PartWriter, *, batch: str, now: datetime) -> None:
    """List a published part in the load's transaction (no-op when it held no new events)."""
    if writer.rows:
        q.record_event_part(session, sha256=writer.sha256, path=str(writer.path.resolve()), rows=writer.rows,
                            batch=batch, now=now)


def listed_parts(session: Session) -> list[str] | None:
    """Return the parts that hold every stored event, or ``None`` when they do not cover the warehouse."""
    parts = q.event_part_paths(session)
    missing = [p for p in parts if not Path(p).is_file()]
    if missing:
        _log.warning("the event store misses %d listed part(s) (e.g. %s); features read the events table",
                     len(missing), missing[0])
        return None
    if not parts and q.has_events(session):
        _log.warning("the warehouse holds events loaded before the event store existed; features read "
                     "the events table (slower)")
        return None
    return parts
