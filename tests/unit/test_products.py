"""The product catalogue end to end: contract, warehouse, point-in-time interactions, recommender."""

from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import select

from mlpkg import stages
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.simulator.lab import harness

pytestmark = pytest.mark.unit


def test_an_export_made_before_products_existed_still_loads(settings, engine):
    batch = harness.land_simulated_batch(settings, "initial")["batch_dir"]
    (pd.io.common.Path(batch) / "products.csv").unlink()
    events = pd.read_parquet(f"{batch}/events.parquet").drop(columns=["product_id"])
    events.to_parquet(f"{batch}/events.parquet", index=False)
    orders = pd.read_csv(f"{batch}/orders.csv", dtype=str, keep_default_na=False).drop(columns=["product_id"])
    orders.to_csv(f"{batch}/orders.csv", index=False)

    report = stages.ingest(settings, batch)

    assert report["loaded"]["events"] == len(events) and report["loaded"]["orders"] == len(orders)
    with session_scope(engine) as s:
        assert q.table_counts(s)["products"] == 0
        assert s.scalar(select(m.Event.product_id).where(m.Event.product_id.is_not(None)).limit(1)) is None


def test_products_and_product_ids_reach_the_warehouse(ingested):
    settings, engine = ingested
    with session_scope(engine) as s:
        catalogue = q.product_catalogue(s)
        assert len(catalogue) == 240 and any(not p["in_stock"] for p in catalogue)
        categories = {p["product_id"]: p["category"] for p in catalogue}
        rows = s.execute(select(m.Event.product_id, m.Event.category).where(m.Event.product_id.is_not(None)))
        pairs = rows.all()
        assert pairs and all(categories[p] == c for p, c in pairs)
        assert s.scalar(select(m.Order.product_id).where(m.Order.product_id.is_not(None)).limit(1))


def test_interactions_are_point_in_time(ingested):
    settings, engine = ingested
    with session_scope(engine) as s:
        every = q.product_interactions(s, pd.Timestamp("2100-01-01", tz="UTC").to_pydatetime())
        cut = sorted(r[3] for r in every)[len(every) // 2]
        before = q.product_interactions(s, cut)
        after = q.product_interactions(s, pd.Timestamp("2100-01-01", tz="UTC").to_pydatetime(), since=cut)
    assert before and all(q.as_utc(r[3]) < q.as_utc(cut) for r in before)
    assert len(before) + len(after) == len(every)
