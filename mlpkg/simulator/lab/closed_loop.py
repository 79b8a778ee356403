"""The closed loop on the simulated shop: allocate → deliver → respond → feedback → retrain → gate.

This is evaluation code: besides running the product's stages exactly as the DAGs do, it asks
the simulator's oracle for the true incremental value of what was deployed, and of the best
allocation at the same budget, so every round shows how close the learning loop gets.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import numpy as np
import pandas as pd
from sqlalchemy import select

from mlpkg import stages
from mlpkg.allocation.campaign import priced_redemptions
from mlpkg.allocation.cost_calibration import coupon_cost_calibration
from mlpkg.config import Settings
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.simulator.lab import harness

CONTROL = "control"


def _ledger(settings: Settings, campaign_id: str) -> pd.DataFrame:
    from mlpkg.db import models as m
    from mlpkg.db.engine import make_engine

    with make_engine(settings.resolved_warehouse_url).connect() as conn:
        return pd.read_sql(select(m.Allocation).where(m.Allocation.campaign_id == campaign_id), conn)


def _ope_incremental(settings: Settings, campaign_id: str) -> dict:
    """SNIPS / DR estimate of the model policy's incremental conversions from this round's log."""
    from mlpkg.evaluation.ope import doubly_robust, snips
    from mlpkg.feedback import attribute_campaign

    df = attribute_campaign(stages._engine(settings), campaign_id, settings.campaign.attribution_window_days)
    y = df["converted"].to_numpy(float)
    prop = df["propensity"].to_numpy(float)
    follows_model = (df["arm"] == df["model_arm"]).to_numpy(float)
    follows_control = (df["arm"] == CONTROL).to_numpy(float)
    v_model = snips(follows_model, prop, y)
    v_control = snips(follows_control, prop, y)
    arms = sorted(set(df["arm"]) | set(df["model_arm"]))
    idx = {a: i for i, a in enumerate(arms)}
    logged = df["arm"].map(idx).to_numpy()
    reward_model = np.tile(
        df.groupby("arm")["converted"].mean().reindex(arms).fillna(y.mean()).to_numpy(), (len(df), 1)
    )
    target = np.zeros((len(df), len(arms)))
    target[np.arange(len(df)), df["model_arm"].map(idx).to_numpy()] = 1.0
    base = np.zeros_like(target)
    base[:, idx[CONTROL]] = 1.0 if CONTROL in idx else 0.0
    dr_model = doubly_robust(target, logged, prop, y, reward_model)
    dr_base = doubly_robust(base, logged, prop, y, reward_model)
    n = len(df)
    return {
        "ope_snips_incremental": float((v_model.value - v_control.value) * n),
        "ope_dr_incremental": float((dr_model.value - dr_base.value) * n),
    }


def run_closed_loop(
    settings: Settings,
    rounds: int,
    *,
    days_per_round: int = 7,
    objective: str = "conversions",
    budget: float | None = None,
    on_round: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run ``rounds`` weekly rounds from a cold start and return one row of numbers per round.

    Two yardsticks come from the simulator's oracle, both at the same budget, eligibility and
    cooldown as the product: ``oracle_incremental`` allocates the whole budget over every
    eligible customer (``share_of_oracle`` compares the deployed campaign, control holdout and
    exploration included, with it); ``model_group_oracle`` allocates only what the model was
    given (the model-policy group and the budget left after exploration), so
    ``model_group_share_of_oracle`` measures the model's targeting alone.

    Args:
        settings: CouponOps settings (the state folder should be fresh for a cold start).
        rounds: Weekly rounds to run.
        days_per_round: Days the simulated clock moves between rounds.
        objective: Campaign objective (``conversions``, ``revenue`` or ``profit``).
        budget: Budget per round; defaults to ``settings.campaign.budget``.
        on_round: Called with each round's row as soon as it is done.

    Returns:
        One dict per round (true, measured and OPE increments, oracle yardsticks, retraining
        and gate outcome).
    """
    stages.init_stores(settings)
    budget = float(budget if budget is not None else settings.campaign.budget)
    rows = []
    for r in range(1, rounds + 1):
        day = harness.world_clock(settings, next_round=True, days=days_per_round)
        shop = harness.load_world(settings)
        ctx = stages.RunContext(dag_id="closed_loop", run_id=f"round-{r}-{day}", logical_date=day)
        stages.ingest(settings, harness.land_next_batch(settings)["batch_dir"], now=shop.now.to_pydatetime())
        campaign = stages.campaign_id_for(day)
        # The coupons left when the campaign allocates: the oracle faces the same stock.
        stock = _coupon_stock(settings)
        summary = stages.allocate(
            settings,
            ctx,
            campaign_id=campaign,
            as_of=day,
            budget=budget,
            objective=objective,
            cold_start=True,
        )
        stages.deliver(settings, campaign, now=shop.now.to_pydatetime())
        batch = harness.simulate_responses(settings, campaign)
        later = shop.now.to_pydatetime() + timedelta(days=settings.campaign.attribution_window_days + 1)
        stages.ingest_feedback(settings, batch["feedback_dir"], now=later)
        measured = stages.measure(settings, campaign, now=later)

        ledger = _ledger(settings, campaign)
        deployed = ledger[["customer_id", "arm"]]
        truth = shop.oracle_value(deployed, margin=settings.campaign.margin)
        # The oracle faces the same eligibility as the product: nobody on coupon cooldown.
        cooling = _on_cooldown(settings, shop.now)
        margin = settings.campaign.margin
        oracle = _oracle_value(shop, ledger["customer_id"], cooling, budget, objective, margin, stock)
        model_rows = ledger[ledger["policy"] == "model"]
        model_group = model_rows[["customer_id", "arm"]]
        model_truth = shop.oracle_value(model_group, margin=settings.campaign.margin)
        # The model's own yardstick: the oracle on the customers and budget the model was given
        # (what is left once the control group is held out and exploration has spent its share),
        # not on what the model itself expected to spend.
        explore_spend = float(ledger.loc[ledger["policy"] == "explore", "expected_cost"].sum())
        model_budget = max(budget - explore_spend, 1e-9)
        explored = ledger.loc[ledger["policy"] == "explore", "coupon_id"].value_counts()
        model_stock = {c: max(left - int(explored.get(c, 0)), 0) for c, left in stock.items()}
        oracle_model = _oracle_value(
            shop, model_rows["customer_id"], cooling, model_budget, objective, margin, model_stock
        )
        row = {
            "round": r,
            "campaign": campaign,
            "model_version": summary.get("model_version") or "none (explore)",
            # The version that allocated its share of the model group beside the champion, if any.
            "live_challenger": (summary.get("live_comparison") or {}).get("challenger_version"),
            "treated": int((ledger["arm"] != CONTROL).sum()),
            "spend": round(float(ledger["expected_cost"].sum()), 2),
            # What the campaign costs in truth (coupons redeemed and messages sent), next to the oracle's.
            "true_spend": round(float(truth["expected_coupon_cost"] + truth["send_cost"]), 2),
            "oracle_true_spend": round(float(oracle["expected_coupon_cost"] + oracle["send_cost"]), 2),
            "true_incremental": round(float(truth["incremental_conversions"]), 2),
            # The model-policy group vs the random control group: a randomized, unbiased comparison.
            "model_group_true": round(float(model_truth["incremental_conversions"]), 2),
            "model_group_measured": round(float(measured["incremental_conversions"]), 2),
            "measured_ci": [round(float(x), 1) for x in measured["incremental_conversions_ci"]],
            **{k: round(v, 2) for k, v in _ope_incremental(settings, campaign).items()},
            "oracle_incremental": round(float(oracle["incremental_conversions"]), 2),
            "model_group_oracle": round(float(oracle_model["incremental_conversions"]), 2),
        }
        # A campaign that spends more (or less) in truth than planned is also judged against the
        # oracle given what it really spent: the comparison at equal true spend.
        at_spend = _oracle_value(
            shop, ledger["customer_id"], cooling, max(row["true_spend"], 1e-9), objective, margin, stock
        )
        row["oracle_at_true_spend"] = round(float(at_spend["incremental_conversions"]), 2)
        row["share_of_oracle"] = _share(row["true_incremental"], row["oracle_incremental"])
        row["share_at_true_spend"] = _share(row["true_incremental"], row["oracle_at_true_spend"])
        row["model_group_share_of_oracle"] = _share(row["model_group_true"], row["model_group_oracle"])
        decision = stages.decide_retrain(settings, ctx, campaign_id=campaign, now=later)
        row["retrained"] = decision["retrain"]
        if decision["retrain"]:
            trained = stages.train(settings, ctx, now=later)
            gate = stages.gate(
                settings,
                model_version=trained["model_version"],
                test_frame=trained["test_frame"],
                run_id=trained["mlflow_run_id"],
                now=later,
            )
            row["gate"] = "promoted" if gate["promoted"] else "kept champion"
            row["gate_outcome"] = gate["outcome"]
            row["model_family"] = trained.get("model_family")
            if gate["champion_version"]:
                # Judged on the next round's customers: those not on cooldown a week from now.
                cooling_next = _on_cooldown(settings, shop.now + timedelta(days=days_per_round))
                row.update(_gate_truth(settings, shop, gate, budget, objective, cooling=cooling_next))
        rows.append(row)
        if on_round:
            on_round(row)
    return rows


def _gate_truth(  # noqa: ANN001 - shop: the simulated Shop
    settings: Settings, shop, gate: dict, budget: float, objective: str, *, cooling: set[str]
) -> dict:
    """Judge a gate decision by the truth: each version's allocation of the next campaign, valued exactly.

    Both versions allocate the same customers (all, less those on cooldown) at the same budget
    through the product's allocator; the simulator values each allocation. The decision was
    right when it promoted the truly better version or kept the truly better champion.
    """
    from mlpkg.data import customer_features
    from mlpkg.registry import score_with_model
    from mlpkg.simulator.lab.policy_quality import allocate_by_scores

    as_of = q.as_utc(shop.now).to_pydatetime()
    feats = customer_features(stages._engine(settings), as_of)
    feats = feats[~feats["customer_id"].isin(cooling)].sort_values("customer_id").reset_index(drop=True)
    ids = feats["customer_id"].tolist()
    with session_scope(stages._engine(settings)) as session:
        calibration = coupon_cost_calibration(session, settings.campaign, before=as_of)
    values = {}
    for role, version in (("challenger", gate["challenger_version"]), ("champion", gate["champion_version"])):
        scores = score_with_model(
            f"models:/{gate['model_name']}/{version}", feats, tracking_uri=settings.resolved_tracking_uri
        )
        alloc = allocate_by_scores(
            ids, scores["p_conv"], scores["revenue"], list(scores["arms"]), shop, budget,
            objective=objective, margin=settings.campaign.margin,
            p_redeem=priced_redemptions(scores, settings.campaign), calibration=calibration,
        )  # fmt: skip
        truth = shop.oracle_value(alloc, margin=settings.campaign.margin)
        values[role] = float(truth["incremental_conversions"])
    better = values["challenger"] > values["champion"]
    return {
        "gate_challenger_true": round(values["challenger"], 2),
        "gate_champion_true": round(values["champion"], 2),
        "gate_right": bool(gate["promoted"] == better),
        "gate_promoted_worse": bool(gate["promoted"] and not better),
        "gate_true_loss": round(values["champion"] - values["challenger"], 2) if gate["promoted"] else 0.0,
    }


def _oracle_value(
    shop, customer_ids, cooling: set[str], budget: float, objective: str, margin: float,
    stock: dict[str, int],
) -> dict:  # noqa: ANN001
    """Value (by the simulator's truth) of the best allocation of ``budget`` over these customers.

    The oracle knows the true costs: a treated conversion redeems the coupon with its true
    probability, so the budget it is given is the budget it spends in truth. It faces what the
    product faced: customers on coupon cooldown are left out, and only the coupons ``stock``
    left (earlier campaigns issued the rest) can be given.
    """
    from mlpkg.simulator.lab.policy_quality import allocate_by_scores

    ids = [c for c in customer_ids.tolist() if c not in cooling]
    conversion = shop.true_conversion(ids)
    alloc = allocate_by_scores(
        ids,
        conversion,
        shop.true_revenue(ids),
        shop.arm_names,
        shop,
        budget,
        objective=objective,
        margin=margin,
        p_redeem=conversion * shop.true_redemption(ids),
        redeemed_basket=shop.true_redeemed_basket(ids),
        coupon_stock=stock,
    )
    return shop.oracle_value(alloc, margin=margin)


def _coupon_stock(settings: Settings) -> dict[str, int]:
    """Coupons left per coupon id in the warehouse (inventory less those issued)."""
    from mlpkg.db import models as m
    with session_scope(stages._engine(settings)) as session:
        rows = session.execute(select(m.Coupon.coupon_id, m.Coupon.inventory, m.Coupon.issued)).all()
    return {str(c): max(int(inv) - int(issued or 0), 0) for c, inv, issued in rows}


def _share(value: float, reference: float) -> float:
    """Return ``value / reference`` rounded, NaN when the reference is not positive."""
    return round(value / reference, 3) if reference > 0 else float("nan")


def _on_cooldown(settings: Settings, now) -> set[str]:  # noqa: ANN001
    """Customers who got a coupon from an earlier campaign within the cooldown period."""
    as_of = q.as_utc(now).to_pydatetime()
    since = as_of - timedelta(days=settings.campaign.cooldown_days)
    with session_scope(stages._engine(settings)) as session:
        return q.customers_on_cooldown(session, since, until=as_of)
