"""Is the measurement honest? Incrementality CIs vs the simulator's truth, and OPE vs true policy value.

1. 20 seeded campaigns through the product's real stages (allocate, deliver, simulated
   response, feedback ingest, attribution, measurement): how often does the measured
   incremental-conversions 95% CI (model-policy group vs random control) cover the true value?
2. Off-policy evaluation on the simulator's logged randomized campaign: SNIPS and DR estimates
   of a different policy's conversion rate vs that policy's true value.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

QUICK = os.environ.get("COUPONOPS_BENCH_QUICK") == "1"


def ci_coverage(n_campaigns: int, n_customers: int) -> dict:
    """Run seeded campaigns through the product and count CI coverage of the true increment."""
    import mlpkg.train
    from mlpkg import stages
    from mlpkg.allocation.campaign import allocate_campaign
    from mlpkg.config import Settings
    from mlpkg.db import models as m
    from mlpkg.db.engine import make_engine

    with tempfile.TemporaryDirectory(prefix="couponops-measure-") as tmp:
        settings = Settings(
            _env_file=None,
            state_dir=Path(tmp) / "state",
            simulator_customers=n_customers,
            campaign={"cooldown_days": 0, "control_share": 0.2, "exploration_share": 0.05},
        )
        stages.init_stores(settings)
        stages.ingest(settings, stages.land_simulated_batch(settings, "initial")["batch_dir"])
        shop = stages.load_world(settings)

        class Oracle:
            arms = list(shop.arm_names)

            def score_arrays(self, df, chunk_size=None):  # noqa: ANN001, ANN201
                ids = df["customer_id"].astype(str).tolist()
                return {"p_conv": shop.true_conversion(ids), "revenue": shop.true_revenue(ids)}

        original = mlpkg.train.load_uplift_model
        mlpkg.train.load_uplift_model = lambda uri, tracking_uri=None: Oracle()
        engine = make_engine(settings.resolved_warehouse_url)
        rows = []
        try:
            now = shop.now.to_pydatetime()
            later = now + pd.Timedelta(days=8)
            for k in range(n_campaigns):
                cid = f"cov-{k:02d}"
                allocate_campaign(
                    engine,
                    settings,
                    campaign_id=cid,
                    as_of=now,
                    run_key=cid,
                    model_uri="oracle",
                    model_version="oracle",
                    now=now,
                    budget=settings.campaign.budget * 3,
                    objective="conversions",
                )
                stages.deliver(settings, cid, now=now)
                batch = stages.collect_feedback(settings, cid)
                stages.ingest_feedback(settings, batch["feedback_dir"], now=later)
                measured = stages.measure(settings, cid, now=later)
                with engine.connect() as conn:
                    ledger = pd.read_sql(
                        m.Allocation.__table__.select().where(m.Allocation.campaign_id == cid), conn
                    )
                truth = shop.oracle_value(ledger.loc[ledger.policy == "model", ["customer_id", "arm"]])
                lo, hi = measured["incremental_conversions_ci"]
                rows.append(
                    {
                        "campaign": cid,
                        "true": truth["incremental_conversions"],
                        "measured": measured["incremental_conversions"],
                        "lo": lo,
                        "hi": hi,
                        "covered": lo <= truth["incremental_conversions"] <= hi,
                    }
                )
        finally:
            mlpkg.train.load_uplift_model = original
            engine.dispose()
    table = pd.DataFrame(rows)
    print(table.round(2).to_string(index=False))
    return {"coverage": float(table["covered"].mean()), "n": len(table)}


def ope_accuracy(n_customers: int, seed: int = 11) -> dict:
    """SNIPS and DR estimates of a non-logging policy on the simulator's randomized campaign log."""
    from mlpkg.evaluation.ope import doubly_robust, snips
    from mlpkg.simulator import Shop, ShopConfig

    shop = Shop(ShopConfig(seed=seed, n_customers=n_customers, campaign_share=1.0))
    log = shop.past_campaign()
    arms = list(shop.arm_names)
    ids = log["customer_id"].astype(str).tolist()
    truth = shop.true_conversion(ids)
    # Target policy: the best *email* coupon by a noisy version of the truth where consented, else control.
    rng = np.random.default_rng(seed)
    noisy = truth + rng.normal(0, 0.01, truth.shape)
    deliverable = np.column_stack([np.ones(len(ids), bool), shop.deliverable(ids)])
    email = np.array([a == "control" or a.endswith("@email") for a in arms])
    score = np.where(deliverable & email[None, :], noisy, -np.inf)
    target_arm = np.argmax(score, axis=1)
    true_value = float(truth[np.arange(len(ids)), target_arm].mean())
    logged = log["arm"].map({a: i for i, a in enumerate(arms)}).to_numpy()
    y = log["converted"].to_numpy(float)
    prop = log["propensity"].to_numpy(float)
    follows = (logged == target_arm).astype(float)
    sn = snips(follows, prop, y)
    target = np.zeros((len(ids), len(arms)))
    target[np.arange(len(ids)), target_arm] = 1.0
    # A deliberately simple reward model (per-arm mean): DR must not need a perfect one.
    arm_means = pd.Series(y).groupby(logged).mean().reindex(range(len(arms))).fillna(y.mean()).to_numpy()
    dr = doubly_robust(target, logged, prop, y, np.tile(arm_means, (len(ids), 1)))
    return {
        "true": true_value,
        "snips": float(sn.value),
        "dr": float(dr.value),
        "n": len(ids),
        "ess": float(sn.effective_sample_size),
    }


def run(out_dir: Path) -> list[dict]:
    """Run both checks and return benchmark results."""
    cov = ci_coverage(8 if QUICK else 20, 1500 if QUICK else 4000)
    ope = ope_accuracy(20_000 if QUICK else 60_000)
    print(
        f"OPE: true {ope['true']:.5f}  SNIPS {ope['snips']:.5f}  DR {ope['dr']:.5f}  (n={ope['n']}, "
        f"ESS={ope['ess']:.0f})"
    )
    return [
        {
            "name": "incrementality_ci_coverage",
            "value": cov["coverage"],
            "unit": "share",
            "reference": "nominal 95% (target >= 0.90)",
            "reference_value": 0.95,
            "ratio": cov["coverage"] / 0.95,
            "campaigns": cov["n"],
        },
        {
            "name": "ope_snips_vs_truth",
            "value": ope["snips"],
            "unit": "conv/customer",
            "reference": "simulator true policy value",
            "reference_value": ope["true"],
            "ratio": ope["snips"] / ope["true"],
            "n": ope["n"],
        },
        {
            "name": "ope_dr_vs_truth",
            "value": ope["dr"],
            "unit": "conv/customer",
            "reference": "simulator true policy value",
            "reference_value": ope["true"],
            "ratio": ope["dr"] / ope["true"],
            "n": ope["n"],
        },
    ]
