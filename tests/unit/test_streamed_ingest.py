"""A large events file is validated and loaded in chunks with the same contract as a whole file.

``COUPONOPS_INGEST_CHUNK_ROWS=1000`` makes the 600-customer shop's 18k events stream in 18 chunks:
failures must name the *file's* rows with counts over the whole file, a key repeated in two
chunks is refused, a contradiction of a stored event found while loading quarantines the batch
and leaves the warehouse and the event store as they were, and a replay adds only new events.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from mlpkg import stages
from mlpkg.data import customer_features, event_summary, read_history
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.features import summarise_events
from tests.fixtures import run_cli

pytestmark = pytest.mark.unit

CHUNK = 1000


_cli = run_cli


@pytest.fixture
def streamed(ingested, monkeypatch):
    monkeypatch.setenv("COUPONOPS_INGEST_CHUNK_ROWS", str(CHUNK))
    return ingested


def _stored_events(settings) -> pd.DataFrame:
    return pd.read_parquet(settings.raw_dir / "initial" / "events.parquet")


def _new_events(settings, n: int = 3500) -> pd.DataFrame:
    """``n`` new events (ids X0, X1, ...) of stored customers, a day before the shop's last event."""
    base = _stored_events(settings).sample(n, replace=True, random_state=1).reset_index(drop=True)
    return base.assign(event_id=[f"X{i}" for i in range(n)], ts=base["ts"] - pd.Timedelta(days=1))


def _events_batch(settings, name: str, events: pd.DataFrame):
    folder = settings.raw_dir / name
    folder.mkdir(parents=True)
    events.to_parquet(folder / "events.parquet", index=False)
    return folder


def _snapshot(engine):
    with session_scope(engine) as s:
        return q.table_counts(s), q.table_checksums(s), q.event_part_paths(s)


def _quarantine_result(settings, name: str) -> dict:
    [folder] = [p for p in settings.quarantine_dir.iterdir() if p.name.startswith(name)]
    assert not (folder / "events.parquet").is_symlink()
    return json.loads((folder / "validation_result.json").read_text())


def test_a_streamed_file_loads_the_same_rows_and_features_as_a_whole_file(streamed, tmp_path):
    settings, engine = streamed
    events = _new_events(settings)
    as_of = pd.Timestamp("2025-06-29T12:00:00Z").to_pydatetime()
    before = customer_features(engine, as_of)
    # A copy of the warehouse as it is now loads the same file whole (one chunk).
    whole_state = tmp_path / "whole-state"
    shutil.copytree(settings.state_dir, whole_state)
    whole = settings.model_copy(update={"state_dir": whole_state, "ingest_chunk_rows": len(events) + 1})
    folder = _events_batch(settings, "more", events)
    whole_folder = whole.raw_dir / "more"
    shutil.copytree(folder, whole_folder)

    result = _cli("ingest", folder)
    assert result.exit_code == 0, result.output
    assert stages.ingest(whole, whole_folder)["loaded"] == {"events": len(events)}
    with session_scope(engine) as s:
        parts = q.event_part_paths(s)
        streamed_sums = q.table_checksums(s)
    from mlpkg.db.engine import make_engine

    with session_scope(make_engine(whole.resolved_warehouse_url)) as s:
        whole_sums = q.table_checksums(s)
    assert streamed_sums["events"] == whole_sums["events"]
    assert len(parts) == 2  # the initial batch's part and this file's
    assert len(pd.read_parquet(parts[-1])) == len(events)

    after = customer_features(engine, as_of)
    assert not after.equals(before)  # the new events count
    # From the event store and from the events table (the fallback) the features agree.
    history = read_history(engine, as_of)["events"]
    pd.testing.assert_frame_equal(
        event_summary(engine, as_of).sort_values("customer_id").reset_index(drop=True),
        summarise_events(history, pd.Timestamp(as_of)).sort_values("customer_id").reset_index(drop=True),
    )


def test_bad_values_in_later_chunks_name_the_files_rows_and_count_over_the_file(streamed):
    settings, engine = streamed
    events = _new_events(settings)
    events.loc[1500, "customer_id"] = " " + events.loc[1500, "customer_id"]
    events.loc[[2500, 2501, 3400], "event_type"] = "bogus"
    folder = _events_batch(settings, "bad-values", events)
    before = _snapshot(engine)

    result = _cli("ingest", folder)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    out = " ".join(result.output.split())
    assert "events.parquet" in out
    assert "row 1500" in out and "customer_id" in out and "whitespace" in out
    assert "row 2500" in out and "row 3400" in out and "'bogus'" in out
    assert _snapshot(engine) == before
    found = _quarantine_result(settings, "bad-values")["reports"]["events"]
    by_rule = {f["column"]: f for f in found["failures"]}
    assert by_rule["event_type"]["failing_count"] == 3  # rows of chunks 3 and 4, one failure
    assert [r["_row"] for r in by_rule["event_type"]["sample_rows"]] == [2500, 2501, 3400]
    assert found["row_count"] == len(events)


def test_an_event_id_repeated_in_two_chunks_is_refused(streamed):
    settings, engine = streamed
    events = _new_events(settings)
    events.loc[2900, "event_id"] = events.loc[10, "event_id"]
    folder = _events_batch(settings, "repeated", events)
    before = _snapshot(engine)

    result = _cli("ingest", folder)
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "unique_key" in out and "'X10'" in out and "row 2900" in out
    assert _snapshot(engine) == before


def test_a_contradiction_found_while_loading_refuses_the_batch_and_keeps_everything(streamed):
    settings, engine = streamed
    stored = _stored_events(settings).head(2500)
    changed = stored.copy()
    changed.loc[2200, "event_type"] = "search" if changed.loc[2200, "event_type"] != "search" else "page_view"
    events = pd.concat([_new_events(settings, 1800), changed], ignore_index=True)
    folder = _events_batch(settings, "contradicts", events)
    before = _snapshot(engine)

    result = _cli("ingest", folder)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    out = " ".join(result.output.split())
    key = stored.loc[2200, "event_id"]
    assert "no_contradiction" in out and repr(key) in out and "row 4000" in out
    assert _snapshot(engine) == before
    assert [p.name for p in settings.event_store_dir.iterdir() if p.name.startswith(".")] == []
    report = _quarantine_result(settings, "contradicts")["reports"]["events"]
    assert report["failures"][0]["sample_rows"][0]["_row"] == 4000


def test_a_replayed_file_adds_only_its_new_events(streamed):
    settings, engine = streamed
    stored = _stored_events(settings)
    fresh = _new_events(settings, 1500)
    # Stored events interleaved with new ones, so every chunk holds some of both.
    events = pd.concat([stored.head(3000), fresh], ignore_index=True).sample(frac=1.0, random_state=3)
    folder = _events_batch(settings, "replay", events.reset_index(drop=True))
    with session_scope(engine) as s:
        n_before = s.scalar(select(func.count()).select_from(m.Event))

    result = _cli("ingest", folder)
    assert result.exit_code == 0, result.output
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(m.Event)) == n_before + len(fresh)
        parts = q.event_part_paths(s)
    part = pd.read_parquet(parts[-1])
    assert sorted(part["event_id"]) == sorted(fresh["event_id"])
    total = sum(len(pd.read_parquet(p)) for p in parts)
    assert total == n_before + len(fresh)  # no event counted twice by features


def test_features_fall_back_to_the_events_table_when_a_part_is_missing(streamed, caplog):
    settings, engine = streamed
    as_of = pd.Timestamp("2025-06-30T00:00:00Z").to_pydatetime()
    from_store = customer_features(engine, as_of)
    with session_scope(engine) as s:
        [part] = q.event_part_paths(s)
    moved = settings.state_dir / "moved.parquet"
    shutil.move(part, moved)
    with caplog.at_level(logging.WARNING, logger="mlpkg.event_store"):
        from_table = customer_features(engine, as_of)
    assert "misses 1 listed part" in caplog.text
    pd.testing.assert_frame_equal(from_store, from_table)
    numeric = from_store.select_dtypes("number")
    assert np.isfinite(numeric.to_numpy()).all() and numeric["page_views_30d"].sum() > 0


def test_a_dry_run_of_a_streamed_file_counts_new_and_unchanged_rows(streamed):
    settings, engine = streamed
    events = pd.concat([_stored_events(settings).head(1200), _new_events(settings, 2300)], ignore_index=True)
    folder = _events_batch(settings, "dry", events)
    before = _snapshot(engine)

    report = stages.ingest(settings.model_copy(update={"ingest_chunk_rows": CHUNK}), folder, dry_run=True)
    assert report["changes"]["events"] == {"new": 2300, "unchanged": 1200, "updated": 0, "corrected": 0}
    assert _snapshot(engine) == before
    assert (folder / "events.parquet").is_file()
