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


@pytest.mark.model
def test_recommender_is_registered_champion_and_ranks_only_pseudonyms(ingested):
    from mlflow import MlflowClient

    from mlpkg import registry
    from mlpkg.db import queries as q

    settings, engine = ingested
    with session_scope(engine) as s:
        as_of = max(q.as_utc(r[3]) for r in q.product_interactions(s, pd.Timestamp("2100-01-01", tz="UTC")))
    result = stages.train_recommender(settings, as_of=as_of.to_pydatetime(), actor="test")

    # On the simulator the factor model beats both baselines, so it becomes the champion.
    assert result["alias"] == registry.CHAMPION, result["reason"]
    for base in ("popularity", "category_affinity"):
        assert result["metrics"]["model"]["ndcg@10"] > result["metrics"][base]["ndcg@10"]
    client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_tracking_uri)
    name = settings.recommender.registered_model_name
    assert str(client.get_model_version_by_alias(name, "champion").version) == result["version"]
    model, version = registry.load_recommender(settings.resolved_tracking_uri, name)
    with session_scope(engine) as s:
        customers = sorted(q.known_ids(s, m.Customer.customer_id))
        stocked = {p["product_id"] for p in q.product_catalogue(s) if p["in_stock"]}
    # The model knows the warehouse's pseudonyms, never the shop's ids (C0000001, ...).
    assert set(model.customers) <= set(customers)
    assert not any(str(c).startswith("C0") for c in model.customers)
    ranked = model.rank(customers[:20], 5, candidates=stocked)
    assert all(len(items) == 5 and {p for p, _ in items} <= stocked for items in ranked.values())


def test_templates_render_products_and_a_settings_folder_overrides_them(tmp_path):
    from mlpkg.delivery.templates import MessageRenderer

    payload = {"campaign_id": "cmp-1", "customer_id": "psn", "channel": "email", "coupon_id": "PCT10",
               "offer": "10% off", "products": [{"product_id": "P7", "category": "home", "price": 19.5}]}
    packaged = MessageRenderer(currency="EUR").render(payload)
    assert "PCT10" in packaged.text and "P7 (home): 19.50 EUR" in packaged.text
    assert 'data-product-id="P7"' in packaged.html and packaged.subject == "A coupon for you: 10% off"
    plain = MessageRenderer().render({**payload, "products": []})
    assert "Picked for you" not in plain.text and "P7" not in plain.html

    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "subject.txt.j2").write_text("{{ offer }} <b>now</b>")
    (tmp_path / "email" / "body.html.j2").write_text("<p>{{ products[0].category }} {{ offer }}</p>")
    custom = MessageRenderer(tmp_path).render({**payload, "offer": "<10% off>"})
    assert custom.subject == "<10% off> <b>now</b>"  # text templates are not HTML-escaped
    assert custom.html == "<p>home &lt;10% off&gt;</p>\n"  # HTML templates are
    assert "PCT10" in custom.text  # the packaged text body still applies
