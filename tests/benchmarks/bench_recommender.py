"""Does personalised content pay? The recommender against its baselines, then against no products.

1. Ranking quality on a time split of the simulated shop's history (the product's own
   evaluation, :func:`mlpkg.recommend.training.evaluate_time_split`): recall@10 and NDCG@10 of the
   factor model (implicit ALS) against popularity and category affinity, all trained on the
   history before ``as_of - 14 days`` and scored on what customers interacted with in the last
   14 days.
2. A closed loop through the product: one campaign gives a fixed coupon by email to a random
   share of the shop's customers; the product's recommendation stage (which trains and registers
   the recommender) ranks their products and delivery renders and writes the messages to the file
   channel. The shop reads the messages it received and the simulator's truth values the same
   coupons three ways: with the products the messages showed, with the most popular eligible
   products instead, and with no products. Values are exact expectations (no sampling noise).
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

QUICK = os.environ.get("COUPONOPS_BENCH_QUICK") == "1"
COUPON, CHANNEL = "PCT20", "email"


def _settings(state: Path, n_customers: int):  # noqa: ANN202 - mlpkg.config.Settings
    from mlpkg.config import Settings

    return Settings(_env_file=None, state_dir=state, simulator_customers=n_customers, clock="data")


def run(out_dir: Path) -> list[dict]:
    """Run both parts and return their results."""
    from mlpkg import stages
    from mlpkg.db import models as m
    from mlpkg.db import queries as q
    from mlpkg.db.engine import make_engine, session_scope
    from mlpkg.delivery.templates import products_for_message
    from mlpkg.privacy import pseudonym_key, stored_id
    from mlpkg.recommend.training import evaluate_time_split
    from mlpkg.simulator.lab import harness
    from mlpkg.simulator.landing import addressed_customers, read_outbox

    n_customers = 2000 if QUICK else 6000
    with tempfile.TemporaryDirectory(prefix="couponops-recommender-") as tmp:
        settings = _settings(Path(tmp) / "state", n_customers)
        stages.init_stores(settings)
        batch = harness.land_simulated_batch(settings, "initial")
        stages.ingest(settings, batch["batch_dir"])
        engine = make_engine(settings.resolved_warehouse_url)
        as_of = pd.Timestamp(batch["as_of"]).to_pydatetime()

        evaluation = evaluate_time_split(engine, settings, as_of)

        # One campaign: the same coupon by email to a random 40% of the customers.
        shop = harness.load_world(settings)
        key = pseudonym_key(settings)
        rng = np.random.default_rng(7)
        chosen = sorted(rng.choice(shop.customer_ids, size=int(0.4 * len(shop.customer_ids)), replace=False))
        campaign = "cmp-content"
        with session_scope(engine) as s:
            s.add(m.Campaign(campaign_id=campaign, created_at=as_of, as_of=as_of, budget=1e9, committed=0.0,
                             objective="conversions", status="allocated", summary={}))
            s.flush()
            s.add_all([m.Allocation(campaign_id=campaign, customer_id=stored_id(key, c),
                                    arm=f"{COUPON}@{CHANNEL}", coupon_id=COUPON, channel=CHANNEL,
                                    policy="model", propensity=1.0, created_at=as_of) for c in chosen])
        recommended = stages.recommend(settings, campaign, now=as_of + timedelta(hours=1))
        delivered = stages.deliver(settings, campaign, now=as_of + timedelta(hours=1))

        messages = addressed_customers(shop, read_outbox(settings.outbox_dir))
        with session_scope(engine) as s:
            catalogue = {p["product_id"]: p for p in q.product_catalogue(s)}
            min_basket = float(s.get(m.Coupon, COUPON).min_basket)
        # The baseline content: the most popular products (by customers interacting) that qualify.
        with session_scope(engine) as s:
            seen = [p for _, p, _, _ in q.product_interactions(s, as_of)]
        counts = pd.Series(seen).value_counts()
        n_shown = settings.recommender.products_per_message
        eligible = products_for_message(list(counts.index), catalogue, min_basket, n_shown)
        popular = [p["product_id"] for p in eligible]
        arms = [f"{COUPON}@{CHANNEL}"] * len(messages)
        base = pd.DataFrame({"customer_id": messages["customer_id"].to_numpy(), "arm": arms})
        personal = shop.oracle_value(base.assign(products=list(messages["products"])))
        popularity = shop.oracle_value(base.assign(products=[popular] * len(base)))
        plain = shop.oracle_value(base)

    rows = []
    for method in ("popularity", "category_affinity"):
        for metric in ("recall@10", "ndcg@10"):
            mine, theirs = evaluation.metrics["model"][metric], evaluation.metrics[method][metric]
            rows.append({
                "name": f"recommender_{metric.replace('@', '_at_')}_vs_{method}",
                "value": mine, "unit": metric, "reference": f"{method} baseline", "reference_value": theirs,
                "ratio": mine / theirs if theirs else float("inf"),
                "test_customers": evaluation.test_customers, "split_at": evaluation.split_at.isoformat(),
                "customers": n_customers,
            })
    details = {
        "messages": int(len(messages)), "sent": delivered.get("sent"),
        "recommended_rows": recommended.get("rows"),
        "products_per_message": n_shown, "popular_products": popular, "customers": n_customers,
        "with_personal_products": personal, "with_popular_products": popularity, "without_products": plain,
    }
    rows.append({
        "name": "content_incremental_conversions_vs_none",
        "value": personal["incremental_conversions"], "unit": "conv",
        "reference": "same coupons, no products", "reference_value": plain["incremental_conversions"],
        "ratio": personal["incremental_conversions"] / plain["incremental_conversions"], **details,
    })
    rows.append({
        "name": "content_incremental_conversions_vs_popular",
        "value": personal["incremental_conversions"], "unit": "conv",
        "reference": "same coupons, popular products",
        "reference_value": popularity["incremental_conversions"],
        "ratio": personal["incremental_conversions"] / popularity["incremental_conversions"], **details,
    })
    return rows
