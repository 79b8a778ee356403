"""Allocate the arms of an imported campaign log to a file of customers (bring-your-own data).

The model is the champion trained on that log (``couponops train --log NAME``); the only
coupling constraint is the budget in the log's per-arm costs, and each customer gets at most
one arm. The output CSV has ``customer_id,arm``, with the log's control label for customers
who get nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from mlpkg import registry
from mlpkg.allocation.solver import AllocationProblem, solve_lagrangian
from mlpkg.campaign_logs import log_arms_and_costs, log_feature_columns
from mlpkg.config import Settings
from mlpkg.db import models as m
from mlpkg.db.engine import session_scope

CONTROL = "control"


def read_customers(path: Path, id_column: str, features: list[str]) -> pd.DataFrame:
    """Read the customers file (CSV or Parquet) and check it has the id and feature columns."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"customers file {path} does not exist")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, encoding="utf-8")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path.name}: cannot be read as a customers table: {exc}") from exc
    missing = [c for c in [id_column, *features] if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path.name}: missing column(s) {missing} required by the log's model "
            f"(id column {id_column!r} and the features it was trained on)"
        )
    if df[id_column].isna().any() or df[id_column].duplicated().any():
        raise ValueError(f"{path.name}: column {id_column!r} must hold unique, non-null customer ids")
    return df


def allocate_imported(
    engine: Engine,
    settings: Settings,
    *,
    log_name: str,
    customers_file: Path,
    budget: float,
    objective: str,
    out: Path,
) -> dict:
    """Allocate a log's arms to the customers in ``customers_file`` within ``budget``; write ``out``."""
    if budget < 0 or not np.isfinite(budget):
        raise ValueError(f"--budget must be a finite number >= 0, got {budget}")
    _, costs = log_arms_and_costs(engine, log_name)
    numeric, categorical = log_feature_columns(engine, log_name)
    with session_scope(engine) as session:
        log = session.get(m.CampaignLog, log_name)
        id_column = (log.spec or {}).get("id_column", "customer_id")
        control_label = log.control_label
    model_name = f"{settings.registered_model_name}-{log_name}"
    client = registry.make_client(settings.resolved_tracking_uri)
    version = registry.alias_version(client, model_name, registry.CHAMPION)
    if version is None:
        raise LookupError(registry.no_champion_message(client, model_name, log_name=log_name))
    df = read_customers(customers_file, id_column, [*numeric, *categorical])
    scorer = registry.load_uplift_model(
        f"models:/{model_name}/{version}", tracking_uri=settings.resolved_tracking_uri
    )
    scores = scorer.score_arrays(df.rename(columns={id_column: "customer_id"}))
    arms = list(scorer.arms)
    treated = [a for a in arms if a != CONTROL]
    c0 = arms.index(CONTROL)
    idx = [arms.index(a) for a in treated]
    p, r = scores["p_conv"], scores["revenue"]
    uplift = p[:, idx] - p[:, [c0]]
    inc_revenue = p[:, idx] * r[:, idx] - p[:, [c0]] * r[:, [c0]]
    arm_cost = np.array([float(costs.get(a, 0.0)) for a in treated], dtype=np.float32)
    cost = np.broadcast_to(arm_cost, uplift.shape).astype(np.float32)
    value = {
        "conversions": uplift,
        "revenue": inc_revenue,
        "profit": settings.campaign.margin * inc_revenue - cost,
    }.get(objective)
    if value is None:
        raise ValueError(f"--objective must be conversions, revenue or profit, got {objective!r}")
    problem = AllocationProblem(
        value=value.astype(np.float32),
        cost=cost,
        eligible=np.ones_like(cost, dtype=bool),
        option_coupon=np.full(len(treated), -1),
        option_channel=np.full(len(treated), -1),
        budget=float(budget),
        coupon_capacity=np.zeros(0),
        channel_capacity=np.zeros(0),
    )
    result = solve_lagrangian(problem)
    chosen = np.where(
        result.choice >= 0, np.asarray(treated, dtype=object)[np.maximum(result.choice, 0)], control_label
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"customer_id": df[id_column].astype(str), "arm": chosen}).to_csv(out, index=False)
    picked = np.flatnonzero(result.choice >= 0)
    return {
        "log": log_name,
        "model": f"{model_name}@{registry.CHAMPION} (v{version})",
        "customers": len(df),
        "treated": int(len(picked)),
        "spend": float(cost[picked, result.choice[picked]].sum()),
        "budget": budget,
        "expected_incremental_conversions": float(uplift[picked, result.choice[picked]].sum()),
        "solver_gap": float(result.gap),
        "out": str(out),
    }
