"""Evaluate, fit, log and register the recommender; rank products for a campaign's customers.

No leakage: every interaction read here is strictly before the as-of time. The evaluation splits
that history by time: the factor model and the two baselines learn from everything before
``as_of - test_days`` and are scored (recall@k, NDCG@k) on what the customers seen in training
interacted with in the last ``test_days``. The model that is logged and registered is then fitted
on the whole history before ``as_of``. It becomes the ``champion`` when it beats both baselines on
both metrics (else it is registered as ``challenger``); the alias move is recorded like the uplift
model's. MLflow sees pseudonyms only (the warehouse's customer ids).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from mlpkg.config import Settings
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.evaluation.ranking import ranking_metrics
from mlpkg.recommend.models import (
    CategoryAffinityRecommender,
    FactorRecommender,
    PopularityRecommender,
    build_interactions,
)

#: Names of the compared rankers in metrics and tables.
METHODS = ("model", "popularity", "category_affinity")


@dataclass
class SplitEvaluation:
    """Recall@k and NDCG@k of the factor model and the baselines on one time split."""

    split_at: datetime
    as_of: datetime
    k: int
    metrics: dict[str, dict[str, float]]
    train_interactions: int
    test_customers: int

    def beats_baselines(self) -> bool:
        """Return whether the model beats both baselines on recall@k and NDCG@k."""
        mine = self.metrics["model"]
        return all(
            mine[f"{name}@{self.k}"] > self.metrics[base][f"{name}@{self.k}"]
            for base in ("popularity", "category_affinity")
            for name in ("recall", "ndcg")
        )

    def flat(self) -> dict[str, float]:
        """Return the metrics as ``test/<method>/<metric>`` floats (MLflow's names)."""
        out = {f"test/{m}/{k.replace('@', '_at_')}": v for m, d in self.metrics.items() for k, v in d.items()
               if k != "users"}
        out["test/customers"] = float(self.test_customers)
        out["train/interactions"] = float(self.train_interactions)
        return out


def _fit(inter, settings: Settings) -> FactorRecommender:  # noqa: ANN001 - Interactions
    r = settings.recommender
    return FactorRecommender.fit(inter, algorithm=r.algorithm, factors=r.factors, iterations=r.iterations,
                                 regularization=r.regularization, alpha=r.alpha,
                                 learning_rate=r.learning_rate, seed=r.seed)


def evaluate_time_split(engine: Engine, settings: Settings, as_of: datetime) -> SplitEvaluation:
    """Score the factor model and the baselines on the last ``test_days`` before ``as_of``.

    Raises:
        ValueError: no products, or no customer seen in training interacted in the test window.
    """
    k = settings.recommender.k
    split = as_of - timedelta(days=settings.recommender.test_days)
    with session_scope(engine) as session:
        catalogue = q.product_catalogue(session)
        train_rows = q.product_interactions(session, split)
        test_rows = q.product_interactions(session, as_of, since=split)
    if not catalogue:
        raise ValueError("the warehouse holds no products: load a products.csv first")
    products = [p["product_id"] for p in catalogue]
    inter = build_interactions(train_rows, products)
    seen = {str(c) for c in inter.customers}
    relevant = build_interactions(test_rows, products).items_of()
    relevant = {c: items for c, items in relevant.items() if c in seen}
    if not relevant:
        raise ValueError(f"no customer seen before {split:%Y-%m-%d} interacted with a product in the "
                         "test window")
    category = {p["product_id"]: p["category"] for p in catalogue}
    rankers = {
        "model": _fit(inter, settings),
        "popularity": PopularityRecommender(inter),
        "category_affinity": CategoryAffinityRecommender(inter, category),
    }
    customers = sorted(relevant)
    metrics = {}
    for name, ranker in rankers.items():
        ranked = {c: [p for p, _ in items] for c, items in ranker.rank(customers, k).items()}
        metrics[name] = ranking_metrics(ranked, relevant, k)
    return SplitEvaluation(split, as_of, k, metrics, int(inter.matrix.nnz), len(customers))


def fit_recommender(engine: Engine, settings: Settings, as_of: datetime) -> FactorRecommender:
    """Fit the factor model on every interaction before ``as_of``."""
    with session_scope(engine) as session:
        products = [p["product_id"] for p in q.product_catalogue(session)]
        rows = q.product_interactions(session, as_of)
    return _fit(build_interactions(rows, products), settings)


def train_recommender(
    engine: Engine, settings: Settings, as_of: datetime, *, actor: str, now: datetime,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate on a time split, fit on the whole history, log and register in MLflow, move an alias.

    Returns:
        ``version``, ``mlflow_run_id``, ``alias`` (champion or challenger), ``metrics`` (per method)
        and ``as_of``.
    """
    import mlflow
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.entities import Metric, Param

    from mlpkg import registry
    from mlpkg.recommend.pyfunc import ARTIFACT, RecommenderPyfunc, save_factors

    evaluation = evaluate_time_split(engine, settings, as_of)
    model = fit_recommender(engine, settings, as_of)
    r = settings.recommender
    uri = settings.resolved_tracking_uri
    client = registry.make_client(uri)
    experiment_id = registry.ensure_experiment(
        client, r.experiment, artifact_location=f"{settings.resolved_artifact_root}/{r.experiment}",
        description="Training runs of the CouponOps product recommender, scored on a time split "
                    "against popularity and category affinity.",
    )
    run = client.create_run(experiment_id, run_name=f"recommender {as_of:%Y-%m-%d}",
                            tags={**(tags or {}), "as_of": as_of.isoformat()})
    run_id = run.info.run_id
    params = {"algorithm": r.algorithm, "factors": r.factors, "iterations": r.iterations,
              "regularization": r.regularization, "alpha": r.alpha, "test_days": r.test_days, "k": r.k,
              "split_at": evaluation.split_at.isoformat()}
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in evaluation.flat().items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_factors(model, Path(tmp) / "factors.npz")
            mlflow.set_tracking_uri(uri)
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=RecommenderPyfunc(n=r.k), artifacts={ARTIFACT: str(path)},
                    input_example=pd.DataFrame({"customer_id": [str(c) for c in model.customers[:3]]}),
                    registered_model_name=r.registered_model_name,
                    pip_requirements=[f"mlflow=={mlflow.__version__}", f"pandas=={pd.__version__}"],
                )
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    version = str(info.registered_model_version)
    beats = evaluation.beats_baselines()
    alias = registry.CHAMPION if beats else registry.CHALLENGER
    reason = (f"recall@{r.k} {evaluation.metrics['model'][f'recall@{r.k}']:.3f} and NDCG@{r.k} "
              f"{evaluation.metrics['model'][f'ndcg@{r.k}']:.3f} on the last {r.test_days} days "
              + ("beat" if beats else "do not beat") + " popularity and category affinity")
    registry.tag_version(client, r.registered_model_name, version,
                         {"mlflow_run_id": run_id, "as_of": as_of.isoformat(), "gate.reason": reason})
    registry.move_alias(client, engine, name=r.registered_model_name, alias=alias, version=version,
                        actor=actor, reason=reason, now=now)
    return {"version": version, "mlflow_run_id": run_id, "alias": alias, "reason": reason,
            "metrics": evaluation.metrics, "as_of": as_of.isoformat()}


def recommend_campaign(
    engine: Engine, settings: Settings, campaign_id: str, model: FactorRecommender, version: str,
    now: datetime,
) -> dict[str, Any]:
    """Rank in-stock products for every customer the campaign sends a coupon to; rewrite its rows."""
    n = settings.recommender.ranked_per_customer
    with session_scope(engine) as session:
        customers = q.campaign_customers(session, campaign_id)
        stocked = [p["product_id"] for p in q.product_catalogue(session) if p["in_stock"]]
    ranked = model.rank(customers, n, candidates=stocked)
    rows = [
        {"campaign_id": campaign_id, "customer_id": c, "rank": i + 1, "product_id": p, "score": s,
         "model_version": version, "created_at": now}
        for c, items in ranked.items() for i, (p, s) in enumerate(items)
    ]
    with session_scope(engine) as session:
        written = q.replace_recommendations(session, campaign_id, rows)
    return {"campaign_id": campaign_id, "customers": len(customers), "rows": written,
            "model_version": version}
