"""Streamed events on PostgreSQL: COPY through a staging table loads what SQLite loads; a refusal keeps all.

The 600-customer shop's 18k events stream in chunks of 1,000 rows, each written with ``COPY``
into a temporary staging table and inserted with ``ON CONFLICT DO NOTHING`` in the batch's one
transaction.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from sqlalchemy import select

from mlpkg import stages
from mlpkg.data import customer_features
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import make_engine, session_scope
from mlpkg.simulator.lab import harness

pytestmark = pytest.mark.integration

AS_OF = pd.Timestamp("2025-06-29T12:00:00Z").to_pydatetime()


def _settings(state, url=None):
    from mlpkg.config import Settings

    extra = {"warehouse_url": url} if url else {}
    # One key for both warehouses, so the same shop ids become the same pseudonyms.
    extra["privacy"] = {"pseudonym_key": "streamed-ingest-test-key-0123"}
    return Settings(_env_file=None, state_dir=state, simulator_customers=600, ingest_chunk_rows=1000, **extra)


def _events(engine) -> pd.DataFrame:
    with session_scope(engine) as s:
        frame = pd.read_sql(select(m.Event).order_by(m.Event.event_id), s.connection())
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    return frame


def _snapshot(engine):
    with session_scope(engine) as s:
        return q.table_counts(s), q.table_checksums(s)


def _loaded_shop(pg_url, tmp_path):
    """The 600-customer shop's first batch loaded into PostgreSQL: settings, batch, engine, snapshot."""
    settings = _settings(tmp_path / "pg", pg_url)
    stages.init_stores(settings)
    batch = harness.land_simulated_batch(settings, "initial")["batch_dir"]
    stages.ingest(settings, batch)
    engine = make_engine(pg_url)
    return settings, batch, engine, _snapshot(engine)


def test_streamed_events_load_the_same_on_postgresql_and_sqlite(pg_url, tmp_path):
    pg = _settings(tmp_path / "pg", pg_url)
    lite = _settings(tmp_path / "lite")
    for s in (pg, lite):
        stages.init_stores(s)
    batch = harness.land_simulated_batch(pg, "initial")["batch_dir"]
    shutil.copytree(batch, lite.raw_dir / "initial")
    assert stages.ingest(pg, batch)["loaded"] == stages.ingest(lite, lite.raw_dir / "initial")["loaded"]

    pg_engine, lite_engine = make_engine(pg_url), make_engine(lite.resolved_warehouse_url)
    pd.testing.assert_frame_equal(_events(pg_engine), _events(lite_engine))
    pd.testing.assert_frame_equal(customer_features(pg_engine, AS_OF), customer_features(lite_engine, AS_OF))
    pg_engine.dispose()
    lite_engine.dispose()


def test_a_contradiction_in_a_late_chunk_rolls_back_every_copied_chunk(pg_url, tmp_path):
    settings, batch, engine, before = _loaded_shop(pg_url, tmp_path)

    stored = pd.read_parquet(f"{batch}/events.parquet").head(2000)
    fresh = stored.assign(event_id=[f"X{i}" for i in range(len(stored))])
    changed = stored.copy()
    changed.loc[1500, "category"] = changed.loc[1500, "category"] + "-changed"
    folder = settings.raw_dir / "contradicts"
    folder.mkdir()
    pd.concat([fresh, changed], ignore_index=True).to_parquet(folder / "events.parquet", index=False)

    from mlpkg.validation import DataContractError

    with pytest.raises(DataContractError, match="no_contradiction") as err:
        stages.ingest(settings, folder)
    assert "row 3500" in str(err.value)
    assert _snapshot(engine) == before
    quarantined = err.value.quarantine_path
    assert quarantined is not None and (quarantined / "validation_result.json").is_file()
    engine.dispose()


def test_a_key_repeated_in_a_later_chunk_is_the_gates_refusal_not_a_load_error(pg_url, tmp_path):
    """Chunks are copied while the gate reads on, so the repeat reaches COPY before the gate's verdict
    on the whole file: the refusal names the repeated key, and nothing of the batch stays."""
    settings, batch, engine, before = _loaded_shop(pg_url, tmp_path)

    events = pd.read_parquet(f"{batch}/events.parquet").head(3000)
    events = events.assign(event_id=[f"R{i}" for i in range(len(events))])
    events.loc[2500, "event_id"] = "R7"  # chunk 3 repeats a key of chunk 1
    folder = settings.raw_dir / "repeats"
    folder.mkdir()
    events.to_parquet(folder / "events.parquet", index=False)

    from mlpkg.validation import DataContractError

    with pytest.raises(DataContractError, match="unique_key") as err:
        stages.ingest(settings, folder)
    assert "'R7'" in str(err.value) and "row 2500" in str(err.value)
    assert _snapshot(engine) == before
    engine.dispose()
