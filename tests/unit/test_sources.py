"""The landing zone: complete drops only, oldest first, each exactly once; nothing new means skip."""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import func, select

from mlpkg import stages
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.simulator.lab import harness
from mlpkg.simulator.landing import export_to_landing
from mlpkg.sources import complete_drops, pending_drops, stage_drop
from mlpkg.validation import DataContractError

pytestmark = pytest.mark.unit


def _zone(settings):
    return settings.model_copy(update={"landing_url": str(settings.state_dir / "zone")})


def _counts(engine):
    with session_scope(engine) as s:
        return q.table_counts(s)


def test_empty_landing_zone_loads_nothing_and_says_why(settings, engine):
    s = _zone(settings)
    before = _counts(engine)
    result = stages.ingest_landed(s)
    assert result["skipped"] is True and result["loaded"] == []
    assert "no new complete drop" in result["reason"] and str(s.resolved_landing_url) in result["reason"]
    feedback = stages.ingest_landed_feedback(s)
    assert feedback["skipped"] and "feedback" in feedback["reason"]
    assert _counts(engine) == before
    assert not (settings.state_dir / "zone").exists(), "the empty zone stays empty: nothing is invented"


def test_only_complete_drops_count_and_the_oldest_export_comes_first(settings, engine, tmp_path):
    s = _zone(settings)
    shop = harness.load_world(s)
    first = export_to_landing(shop, s.resolved_landing_url, batch_id="zz-history")
    shop.advance(3)
    second = export_to_landing(shop, s.resolved_landing_url, batch_id="aa-later")
    # A drop still being copied has no marker yet; a temporary folder is never read.
    partial = first.parent / "in-progress"
    shutil.copytree(second, partial)
    (partial / "_SUCCESS").unlink()
    drops = complete_drops(s.resolved_landing_url, "batches")
    # Ordered by export time (history first), not by name.
    assert [d.drop_id for d in drops] == ["zz-history", "aa-later"]
    assert drops[0].exported_at < drops[1].exported_at
    assert json.loads((first / "_SUCCESS").read_text())["exported_at"].endswith("Z")


def test_every_batch_loads_exactly_once_and_the_data_clock_follows_the_newest(settings, engine):
    s = _zone(settings).model_copy(update={"clock": "data"})
    shop = harness.load_world(s)
    export_to_landing(shop, s.resolved_landing_url)
    shop.advance(7)
    export_to_landing(shop, s.resolved_landing_url)
    result = stages.ingest_landed(s)
    assert [b["drop_id"] for b in result["loaded"]] == ["shop-20250630T000000", "shop-20250707T000000"]
    assert result["loaded"][0]["rows"]["customers"] > 0
    assert stages.product_now(s).isoformat() == "2025-07-07T00:00:00+00:00"
    after_first = _counts(engine)
    again = stages.ingest_landed(s)
    assert again["skipped"] and _counts(engine) == after_first
    with session_scope(engine) as session:
        statuses = session.execute(select(m.LandedBatch.drop_id, m.LandedBatch.status)).all()
    assert sorted(statuses) == [("shop-20250630T000000", "loaded"), ("shop-20250707T000000", "loaded")]


def test_a_bad_batch_is_quarantined_recorded_and_never_read_again(settings, engine):
    s = _zone(settings)
    shop = harness.load_world(s)
    drop = export_to_landing(shop, s.resolved_landing_url, batch_id="broken")
    (drop / "orders.csv").write_text("order_id,customer_id\n1,2\n")  # columns missing
    before = _counts(engine)
    with pytest.raises(DataContractError, match="orders"):
        stages.ingest_landed(s)
    after = _counts(engine)
    assert after.pop("landed_batches") == 1, "the quarantine is recorded, so the batch is not read again"
    before.pop("landed_batches")
    assert after == before, "a bad batch writes no data"
    with session_scope(engine) as session:
        row = session.get(m.LandedBatch, ("batches", "broken"))
        assert row.status == "quarantined" and "orders" in row.detail["error"]
        assert pending_drops(session, s.resolved_landing_url, "batches") == []
    assert stages.ingest_landed(s)["skipped"]


def test_a_remote_landing_zone_is_staged_locally_before_it_is_read(settings, engine, tmp_path):
    import fsspec

    s = _zone(settings)
    shop = harness.load_world(s)
    local = export_to_landing(shop, tmp_path / "export", batch_id="remote-1")
    fs = fsspec.filesystem("memory")
    for path in local.iterdir():
        fs.pipe_file(f"/shop-zone/batches/remote-1/{path.name}", path.read_bytes())
    drops = complete_drops("memory://shop-zone", "batches")
    assert [d.drop_id for d in drops] == ["remote-1"]
    staged = stage_drop(drops[0], tmp_path / "staging")
    assert sorted(p.name for p in staged.iterdir()) == sorted(p.name for p in local.iterdir())
    remote = s.model_copy(update={"landing_url": "memory://shop-zone"})
    assert stages.ingest_landed(remote)["loaded"][0]["drop_id"] == "remote-1"
    with session_scope(engine) as session:
        assert session.execute(select(func.count()).select_from(m.Customer)).scalar_one() > 0
    fs.rm("/shop-zone", recursive=True)


def test_a_marker_with_a_time_without_zone_is_refused_with_the_file_named(settings, engine):
    s = _zone(settings)
    shop = harness.load_world(s)
    drop = export_to_landing(shop, s.resolved_landing_url, batch_id="naive")
    (drop / "_SUCCESS").write_text(json.dumps({"exported_at": "2025-06-30T00:00:00"}))
    with pytest.raises(ValueError, match=r"naive/_SUCCESS.*no time zone"):
        complete_drops(s.resolved_landing_url, "batches")
